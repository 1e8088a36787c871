"""vlmguard-edit: fold a VLM-Guard safety steering edit into a VLM's weights."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlmguard-edit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
