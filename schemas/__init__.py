"""The curated TFDV schema (`schema.pbtxt`), shipped as package data."""
