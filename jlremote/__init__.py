"""jlremote: a remote JupyterLab in your local browser, over your own OpenSSH."""

__version__ = "0.1.0"
