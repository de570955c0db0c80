"""VaRM (Variation Ratio Merge) for mergekit: importing this package registers the `varm` method."""

from varm_merge.method import ensure_registered, varm_merge

ensure_registered()

__all__ = ["ensure_registered", "varm_merge"]
