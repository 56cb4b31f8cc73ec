"""Test helpers shared by the unit, integration and infra suites."""
