"""Device profiles, shipped as package data (``labmeter.profiles``)."""
