"""`lorafit serve`: many trained runs over HTTP on shared base models."""
