"""What a person receives: the hours report, the national export, findings and evidence bundles, in one
place so that every format and every column definition is shared."""
