"""The collector: subscribe → verify → idempotent ledger → acknowledgements, live state, reports."""
