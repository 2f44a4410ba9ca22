"""The error a data set that cannot be used raises: the message names the setting (``data.root``,
``data.split``, ``ways``) and what to change, so the command line prints it as one line."""

from __future__ import annotations


class DataSetError(ValueError):
    """Data that cannot give the configured tasks: a missing folder, unreadable files, too few
    classes or examples."""
