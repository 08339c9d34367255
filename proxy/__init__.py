"""shadowproxy: mirror live inference traffic to candidate models, compare, keep what diverges."""

from .app import ProxyRunner, create_apps
from .settings import Settings, load_settings

__all__ = ["ProxyRunner", "Settings", "create_apps", "load_settings"]
