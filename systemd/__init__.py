"""systemd units, shipped as package data (``labmeter.systemd``) for ``labmeter agent install``."""
