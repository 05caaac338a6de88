"""labmeter: verified machine hours for shared scientific instruments."""

__version__ = "0.1.0"
