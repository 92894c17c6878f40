"""Helpers and a pytest plugin for people who write or test spon-toolkit plugins."""
