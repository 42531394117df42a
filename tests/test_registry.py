import pytest

from featkd.errors import ConfigError, RegistryError
from featkd.registry import Registry, check_arguments


def make() -> Registry:
    registry = Registry("widget")

    @registry.register("gear")
    def gear(teeth: int = 12, ratio: tuple[float, float] = (1.0, 2.0)) -> dict:
        """A gear with teeth."""
        return {"teeth": teeth, "ratio": ratio}

    @registry.register()
    class Spring:
        """A spring."""

        def __init__(self, stiffness: float) -> None:
            self.stiffness = stiffness

    return registry


def test_register_get_build_and_describe():
    registry = make()
    assert registry.names() == ["Spring", "gear"]
    assert registry.build("gear", teeth=5) == {"teeth": 5, "ratio": (1.0, 2.0)}
    assert registry.build("gear", ratio=[3, 4])["ratio"] == (3.0, 4.0)  # converted to the annotation
    assert registry.build("Spring", stiffness=2).stiffness == 2.0
    assert registry.describe("gear") == "A gear with teeth."


def test_duplicate_name_is_an_error():
    registry = make()
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("gear")(lambda: None)


def test_unknown_name_lists_the_closest():
    with pytest.raises(RegistryError, match=r"unknown widget 'geer'\. Did you mean 'gear'\?.*featkd list widgets"):
        make().get("geer")


def test_arguments_are_checked_by_name_type_and_presence():
    registry = make()
    with pytest.raises(ConfigError, match=r"unknown argument 'teth'\. Did you mean 'teeth'\? Allowed: teeth, ratio"):
        registry.build("gear", teth=3)
    with pytest.raises(ConfigError, match=r"argument 'teeth' got 'many'.*expected int"):
        registry.build("gear", teeth="many")
    with pytest.raises(ConfigError, match="missing required argument.*stiffness"):
        registry.build("Spring")
    with pytest.raises(ConfigError, match="'teeth' is set by featkd"):
        registry.check_arguments("gear", {"teeth": 3}, injected=["teeth"])


def test_check_arguments_accepts_anything_for_kwargs_functions():
    def anything(a: int = 1, **rest):
        return rest

    assert check_arguments(anything, {"a": 2, "b": "x"}, "f") == {"a": 2, "b": "x"}
