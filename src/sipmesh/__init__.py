"""sipmesh: SIP as the session manager for any network application."""

__version__ = "0.1.0"
