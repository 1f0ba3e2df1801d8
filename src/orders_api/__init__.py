"""Multi-tenant Orders API."""
