"""The live view: the web server, its pages and the OpenAPI document of its JSON API."""
