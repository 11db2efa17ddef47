"""Third-party code the tests run, each package with its license and origin (its README.md)."""
