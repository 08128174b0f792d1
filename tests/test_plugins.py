"""The plugin system: hooks, entry points, conflicts, and the `plugins` command."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptools
from adaptools import hookspecs, plugin, registry
from adaptools.plugins import builtin_plugins, pm

EXAMPLE = Path(__file__).parent / "example_plugin"


class FakeDist:
    """A stand-in distribution exposing one entry point, as importlib.metadata would."""

    def __init__(self, name, module):
        self.metadata = {"name": name}
        self.version = "9.9"
        self._name = name
        self.entry_points = [importlib.metadata.EntryPoint(name="scale", value=module, group="adaptools")]

    @property
    def name(self):
        return self._name


def fake_distributions(**kw):
    return [FakeDist("adaptools-scale", "adaptools_scale")]


@pytest.fixture
def reload_plugins(monkeypatch):
    """Reset the plugin manager so a test can load plugins afresh; restore it afterwards."""
    import adaptools.plugins as plugins_module

    saved = [(pm.get_name(p), p) for p in pm.get_plugins()]
    for _, p in saved:
        pm.unregister(p)
    monkeypatch.setattr(plugins_module, "_loaded", False)
    yield
    for p in list(pm.get_plugins()):
        pm.unregister(p)
    for name, p in saved:
        pm.register(p, name=name)
    plugins_module._loaded = True


def test_entry_point_plugin_adds_a_method_info_understands(reload_plugins, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from adaptools.cli import cli

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("ADAPTOOLS_LOAD_PLUGINS", "scale")
    monkeypatch.setattr(importlib.metadata, "distributions", fake_distributions)
    assert "scale" in registry.methods()
    assert registry.methods()["scale"].distribution == "adaptools-scale"
    adapter = adaptools.Adapter(method="scale", config={}, tensors=adaptools.plugin.MemoryStore(
        {"model.layers.0.mlp.down_proj.scale": torch.ones(64)}))
    out = tmp_path / "scale.safetensors"
    adaptools.save(adapter, out)
    result = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "scale"
    assert data["summary"] == {"scaled_modules": 1}
    listing = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).stdout)
    assert {"name": "scale", "distribution": "adaptools-scale"}.items() <= next(
        p for p in listing["plugins"] if p["methods"] == ["scale"]).items()


def test_entry_points_off_means_builtins_only(reload_plugins, monkeypatch):
    monkeypatch.setenv("ADAPTOOLS_LOAD_PLUGINS", "")
    monkeypatch.setattr(importlib.metadata, "distributions", fake_distributions)
    assert "scale" not in registry.methods()
    assert sorted(pm.get_name(p) for p in pm.get_plugins()) == sorted(builtin_plugins())


def test_duplicate_names_are_an_error_naming_both_plugins(reload_plugins):
    class Copy:
        @adaptools.plugin.hookimpl
        def register_methods(self, register):
            from adaptools_plugins.lora.method import LoRA

            register(LoRA())

    registry.methods()
    pm.register(Copy(), name="copycat")
    with pytest.raises(adaptools.plugin.PluginConflictError, match="adaptools_plugins.lora and copycat"):
        registry.methods()


def test_misspelt_hook_is_rejected_at_load(reload_plugins, monkeypatch):
    module = type(sys)("adaptools_typo")

    @adaptools.plugin.hookimpl
    def register_method(register):  # missing "s"
        pass

    module.register_method = register_method
    monkeypatch.setitem(sys.modules, "adaptools_typo", module)
    import adaptools.plugins as plugins_module

    builtins = plugins_module.builtin_plugins()
    monkeypatch.setattr(plugins_module, "builtin_plugins", lambda: [*builtins, "adaptools_typo"])
    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError):
        plugins_module.load_plugins()


def test_unknown_names_suggest_the_closest():
    with pytest.raises(adaptools.plugin.UnknownPluginError, match="did you mean 'lora'"):
        adaptools.plugin.get_method("lorra")


def test_every_hook_is_documented_in_the_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in ("register_methods", "register_formats", "register_backends", "register_validators",
                 "register_commands"):
        spec = getattr(hookspecs, name)
        assert spec.__doc__
        args = ", ".join(getattr(pm.hook, name).spec.argnames)
        assert f"{name}({args})" in readme, name


def test_register_commands_hook_adds_a_command(reload_plugins):
    import click
    from click.testing import CliRunner

    import adaptools.cli as cli_module

    class Extra:
        @adaptools.plugin.hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello-test")
            def hello():
                click.echo("hi")

    pm.register(Extra(), name="extra")
    pm.hook.register_commands(cli=cli_module.cli)
    try:
        assert CliRunner().invoke(cli_module.cli, ["hello-test"]).output == "hi\n"
    finally:
        cli_module.cli.commands.pop("hello-test", None)


def test_plugins_command_lists_builtins_and_operations(cli_runner):
    result = cli_runner("plugins")
    assert result.exit_code == 0
    for expected in ("adaptools_plugins.lora", "methods: lora", "formats: peft", "formats: schema",
                     "backends: fp32, fp16, bf16"):
        assert expected in result.stdout
    data = json.loads(cli_runner("plugins", "--json").stdout)
    assert data["operations"]["lora"] == ["algebra", "apply", "convert", "info", "init", "merge", "plain", "unmerge"]
    assert data["operations"]["bottleneck"] == ["apply", "convert", "info", "merge", "unmerge"]
    assert "unmerge" in data["conditional"]["lora"] and "unmerge" in data["conditional"]["bottleneck"]
    assert data["operations"]["prefix_tuning"] == ["apply", "bake", "convert", "info"]


# --- the v2 contract: what a plugin claims is checked at load ------------------------------------------


def _register_method(obj_factory, name="contract-test"):
    class Plugin:
        @adaptools.plugin.hookimpl
        def register_methods(self, register):
            register(obj_factory())

    pm.register(Plugin(), name=name)
    return name


def test_a_method_claiming_an_operation_it_lacks_is_refused_at_load_naming_the_plugin(cli_runner):
    class Claims(adaptools.plugin.AdapterMethod):
        name = "claims"
        operations = frozenset({"info", "convert", "merge"})  # but no merge_updates

    name = _register_method(Claims)
    try:
        with pytest.raises(plugin.PluginContractError, match="contract-test.*lists merge.*does not implement"):
            registry.methods()
        result = cli_runner("plugins")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.count("\n") == 1 and "contract-test" in result.stderr
    finally:
        pm.unregister(name=name)


def test_a_method_implementing_an_unlisted_operation_is_refused_too():
    class Hides(adaptools.plugin.AdapterMethod, adaptools.plugin.Mergeable):
        name = "hides"
        operations = frozenset({"info", "convert"})

        def merge_updates(self, adapter, base, weight=1.0):
            return []

    name = _register_method(Hides)
    try:
        with pytest.raises(adaptools.plugin.PluginContractError, match="implements merge but its `operations`"):
            registry.methods()
    finally:
        pm.unregister(name=name)


def _group_backend(decode_group):
    class Grouped(adaptools.plugin.Backend):
        name = "grouped-contract-test"

        def find_groups(self, names, tensors=None):
            return {}

        def group_info(self, param, read):
            return torch.float32, (1,)

        def encode_group(self, param, dense, settings):
            return {}

    Grouped.decode_group = decode_group
    return Grouped


@pytest.mark.parametrize("decode_group, refused", [
    (lambda self, param, read, names: None, True),                  # the old three-argument form
    (lambda self, param, read, names, settings=None: None, False),
    (lambda self, param, read, names, *rest: None, False),
    (lambda self, param, read, names, options=None: None, False),   # positionally it still takes four
])
def test_a_group_backend_whose_decode_group_cannot_take_settings_is_refused_at_load(decode_group, refused):
    """The engine re-decodes every group it encodes with the settings it used; an old signature is caught at
    load, naming the plugin, instead of failing mid-merge."""
    backend = _group_backend(decode_group)

    class Plugin:
        @adaptools.plugin.hookimpl
        def register_backends(self, register):
            register(backend())

    pm.register(Plugin(), name="contract-test")
    try:
        if refused:
            with pytest.raises(adaptools.plugin.PluginContractError,
                               match="contract-test.*grouped-contract-test.*decode_group does not take `settings`"):
                registry.backends()
        else:
            assert "grouped-contract-test" in registry.backends()
    finally:
        pm.unregister(name="contract-test")


@pytest.mark.parametrize("methods, refused", [
    (("open_checkpoint", "containers"), False),   # a file backend: dense backends decode what it opens
    (("open_checkpoint",), True),                 # opens files it cannot write
    ((), True),
])
def test_a_backend_must_decode_or_open_files(methods, refused):
    bodies = {"open_checkpoint": lambda self, path: None, "containers": lambda self: ()}
    backend = type("FileBackend", (adaptools.plugin.Backend,),
                   {"name": "file-contract-test", **{m: bodies[m] for m in methods}})

    class Plugin:
        @adaptools.plugin.hookimpl
        def register_backends(self, register):
            register(backend())

    pm.register(Plugin(), name="contract-test")
    try:
        if refused:
            with pytest.raises(adaptools.plugin.PluginContractError, match="file-contract-test.*implements neither"):
                registry.backends()
        else:
            assert "file-contract-test" in registry.backends()
    finally:
        pm.unregister(name="contract-test")


def test_operations_are_derived_from_capabilities():
    class Both(adaptools.plugin.AdapterMethod, adaptools.plugin.Mergeable, adaptools.plugin.RuntimeApplicable):
        name = "both"

        def merge_updates(self, adapter, base, weight=1.0):
            return []

        def apply(self, adapter, model):
            raise NotImplementedError

    assert Both().operations == {"info", "convert", "merge", "apply"}
    with pytest.raises(TypeError):  # a capability left abstract cannot even be made
        type("Half", (adaptools.plugin.AdapterMethod, adaptools.plugin.LowRankAlgebra), {"name": "half",
             "low_rank": lambda self, a: {}})()


def test_a_plugin_that_breaks_inside_its_hook_is_named():
    name = _register_method(lambda: 1 / 0, name="broken-plugin")
    try:
        with pytest.raises(adaptools.plugin.PluginContractError, match="broken-plugin failed in register_methods"):
            registry.methods()
    finally:
        pm.unregister(name=name)


def test_update_kinds_and_severities_are_checked_when_made():
    with pytest.raises(adaptools.plugin.PluginContractError, match="kind 'detla'"):
        adaptools.plugin.TensorUpdate("w", "detla", lambda c, o: c)
    with pytest.raises(adaptools.plugin.PluginContractError, match="severity 'fatal'"):
        adaptools.plugin.Finding("X001", "fatal", "m", "f")
    assert adaptools.plugin.TensorUpdate("w", "delta", lambda c, o: c).kind is adaptools.plugin.UpdateKind.DELTA


def test_the_registry_is_built_once_and_follows_the_plugin_set():
    assert adaptools.plugin.get_method("lora") is adaptools.plugin.get_method("lora")
    before = set(registry.methods())

    class Extra(adaptools.plugin.AdapterMethod):
        name = "extra-method"

    name = _register_method(Extra, name="extra-plugin")
    try:
        assert set(registry.methods()) == before | {"extra-method"}
    finally:
        pm.unregister(name=name)
    assert set(registry.methods()) == before


def test_tracing_shows_every_register_hook_call():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "adaptools", "plugins"], capture_output=True, text=True,
                            env={**__import__("os").environ, "ADAPTOOLS_TRACE_PLUGINS": "1",
                                 "ADAPTOOLS_LOAD_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    for hook in ("register_methods", "register_formats", "register_backends", "register_validators"):
        assert f"hook {hook} -> ['adaptools_plugins." in result.stderr, hook


def test_core_names_no_plugin():
    """The core dispatches on no plugin's name: no whole string or bytes literal in adaptools/ is a built-in
    plugin's method, format, backend or validator name, or that name as a file suffix (``".gguf"``,
    ``"*.gguf"``) or file magic (``b"GGUF"``): recognising a plugin's files is the plugin's job (prose in
    help texts may mention them)."""
    import ast
    import io
    import tokenize

    from adaptools.float_types import FLOAT_TYPES

    names = {*registry.methods(), *registry.formats(), *registry.backends(), *registry.validators(),
             "olora", "pissa", "bitsandbytes"} - {"schema"}  # the schema format is the core's own
    names -= {t.short for t in FLOAT_TYPES}  # dense backends are named after the core's own dtype table
    # the weight files of every ecosystem a checkpoint folder may hold, which an output never copies
    # (checkpoint.py's WEIGHT_SUFFIXES, next to .h5 and .msgpack): a list of extensions, no dispatch
    allowed = {("checkpoint.py", ".gguf")}
    core = Path(adaptools.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            value = None
            if token.type == tokenize.STRING:  # dispatch on a name is a string literal compared or looked up
                try:
                    value = ast.literal_eval(token.string)
                except (ValueError, SyntaxError):
                    continue
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if not isinstance(value, str) or (str(path.relative_to(core)), value) in allowed:
                continue
            if value.lower() in names or value.lower().lstrip("*").removeprefix(".") in names:
                offenders.append(f"{path.relative_to(core)}:{token.start[0]}: {token.line.strip()}")
    assert offenders == []


# --- the two public layers and the families ------------------------------------------------------------------

def test_public_modules_derive_all_from_one_table():
    """Each public module's __all__ is its EXPORTS table, every name resolves, and nothing else is public."""
    assert adaptools.__all__ == ["__version__", *adaptools.EXPORTS]
    assert plugin.__all__ == list(plugin.EXPORTS)
    for module in (adaptools, plugin):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
        assert set(module.__all__) <= set(dir(module))
    # the user's layer holds operations and their types, not the plugin contract
    assert not {"AdapterMethod", "Backend", "hookimpl", "OutputContainer"} & set(adaptools.__all__)
    assert {"load", "save", "merge", "unmerge", "convert", "check", "diff", "combine", "resize", "dequantize",
            "requantize", "plan"} <= set(adaptools.__all__)
    with pytest.raises(AttributeError):
        adaptools.no_such_name  # noqa: B018


def test_an_old_plugin_using_adaptools_names_still_loads_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="adaptools.plugin.AdapterMethod"):
        cls = adaptools.AdapterMethod
    assert cls is plugin.AdapterMethod
    with pytest.warns(DeprecationWarning, match="adaptools.extract"):
        assert adaptools.extract_adapter is adaptools.extract


def _plugin_imports() -> dict[str, set[str]]:
    """module -> the adaptools_plugins modules it imports (relative and absolute, at any depth)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "plugins"
    graph: dict[str, set[str]] = {}

    def module_name(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(("adaptools_plugins", *(p for p in parts if p != "__init__")))

    modules = {module_name(path) for path in root.rglob("*.py")}
    for path in root.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.startswith("adaptools_plugins"):
                    # ``from . import mod`` imports the submodule (its package is already importing)
                    submodules = {f"{target}.{a.name}" for a in node.names} & modules
                    targets |= submodules or {target}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("adaptools_plugins")}
        graph[name] = targets
    return graph


def test_plugin_modules_import_no_circle_and_families_depend_downwards():
    graph = _plugin_imports()
    modules = set(graph)

    def resolve(target: str) -> str | None:  # "pkg.mod" or "pkg" -> a module of the tree
        return target if target in modules else None

    edges = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in graph.items()}
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in edges[node]:
            if seen.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for module in sorted(modules):
        if module not in seen:
            visit(module, [module])

    def family(m: str) -> str:
        return m.split(".")[1] if m.count(".") >= 1 else ""

    families = {(family(a), family(b)) for a, ts in edges.items() for b in ts if family(a) != family(b)}
    for a, b in families:
        assert (b, a) not in families, f"families {a} and {b} import each other"
    assert not any(b == "validators" for _, b in families)  # nothing builds on the validators
    assert not any(a == "peft" for a, _ in families)  # the shared PEFT layer depends on no family


def test_each_family_imports_alone():
    """Every module of a family imports in a fresh interpreter that imported nothing else of the plugins."""
    import adaptools_plugins

    code = ("import importlib, pathlib, adaptools_plugins.{f} as p\n"
            "for m in sorted(pathlib.Path(p.__path__[0]).glob('*.py')):\n"
            "    importlib.import_module(f'{{p.__name__}}.{{m.stem}}')\n")
    for family in adaptools_plugins.FAMILIES:
        result = subprocess.run([sys.executable, "-c", code.format(f=family)], capture_output=True, text=True)
        assert result.returncode == 0, (family, result.stderr[-2000:])


def test_a_new_plugin_in_a_dead_plugins_place_is_collected_afresh(monkeypatch):
    """The registry's cache must not serve a plugin's objects to a new plugin that CPython allocated at a dead
    one's address (the cache was once keyed by ids, and a freed object hands its id on). Every object gets the
    same id here, the worst case of that reuse."""
    monkeypatch.setattr(registry, "id", lambda obj: 0, raising=False)

    class Plugin:
        def __init__(self, name):
            self.backend = type("Seq", (adaptools.plugin.Backend,), {
                "name": name, "open_checkpoint": lambda self, path: None, "containers": lambda self: ()})

        @adaptools.plugin.hookimpl
        def register_backends(self, register):
            register(self.backend())

    for i in range(3):
        pm.register(Plugin(f"seq-test-{i}"), name="seq-test")
        try:
            assert f"seq-test-{i}" in registry.backends()
        finally:
            pm.unregister(name="seq-test")
