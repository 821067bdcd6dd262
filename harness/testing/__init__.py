"""Utilities for testing the harness itself (fault injection); not used by experiments."""
