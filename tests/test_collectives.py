"""The collectives' group registry: close() must be able to forget a model's groups, since a
binding keeps a destroyed gloo group (and its threads) alive."""
import pytest

from pcompile.runtime import collectives


def test_unbind_groups_forgets_every_key_of_those_groups_only():
    mine, other = object(), object()  # stand-ins: the registry only stores and compares them
    collectives.bind_group("test/a/dp", mine)
    collectives.bind_group("test/a/tp", mine)
    collectives.bind_group("test/b/dp", other)
    try:
        collectives.unbind_groups([mine])
        assert collectives._group("test/b/dp") is other
        for key in ("test/a/dp", "test/a/tp"):
            with pytest.raises(RuntimeError, match="no process group is bound"):
                collectives._group(key)
    finally:
        collectives.unbind_groups([mine, other])
