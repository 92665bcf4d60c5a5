"""The three layers import downwards only, and no module imports itself back through others.

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"imunet.runtime": ROOT / "runtime", "imunet.export": ROOT / "export", "imunet": ROOT / "imunet"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``name`` imports, submodules resolved where they exist."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in MODULES else base)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer(name: str) -> str:
    for package in ("imunet.runtime", "imunet.export"):
        if name == package or name.startswith(package + "."):
            return package
    return "imunet"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "imunet.runtime"))
def test_the_runtime_imports_only_itself_of_imunet_and_nothing_heavy(name):
    for dep in GRAPH[name]:
        top = dep.split(".")[0]
        assert top not in ("torch", "onnx", "export", "runtime"), f"{name} imports {dep}"
        if top == "imunet":
            assert layer(dep) == "imunet.runtime", f"{name} imports {dep}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "imunet"))
def test_the_training_side_does_not_import_the_exporter(name):
    assert not [d for d in GRAPH[name] if layer(d) == "imunet.export"], name


def test_no_import_cycles():
    internal = {n: {d for d in deps if d in MODULES and d != n} for n, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(internal[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for n in sorted(internal):
        if n not in state:
            visit(n, [n])


# The runtime's layers, bottom up: what each may import of the runtime (besides errors) and of
# third-party packages. ``None``: any third-party package.
RUNTIME = "imunet.runtime"
IO_LIBRARIES = ("SimpleITK", "pydicom", "highdicom", "dicomweb_client", "PIL", "requests")
BACKEND_LIBRARIES = ("onnxruntime", "openvino", "tensorrt", "cuda")
CLI_LIBRARIES = ("typer", "click", "rich")
LAYERS = {
    "kernels": {"may": ("kernels", "contract.settings", "contract.kinds", "backends.base"),
                "never": IO_LIBRARIES + BACKEND_LIBRARIES + CLI_LIBRARIES},
    "contract": {"may": ("contract", "imaging.domain", "imaging.orientation", "imaging.preprocess", "imaging.prepare"),
                 "never": BACKEND_LIBRARIES + CLI_LIBRARIES},
    "imaging": {"may": ("imaging",), "never": BACKEND_LIBRARIES + CLI_LIBRARIES},
    "backends": {"may": ("backends", "contract"), "never": CLI_LIBRARIES + IO_LIBRARIES},
    "dicom": {"may": ("dicom", "imaging", "contract"), "never": BACKEND_LIBRARIES + CLI_LIBRARIES},
    "app": {"may": ("app", "dicom", "imaging", "contract", "backends", "kernels"), "never": ()},
}  # fmt: skip


def runtime_layer(name: str) -> str | None:
    rest = name[len(RUNTIME) + 1 :] if name.startswith(RUNTIME + ".") else ""
    return rest.split(".")[0] if rest.split(".")[0] in LAYERS else None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if runtime_layer(n)))
def test_each_runtime_layer_imports_only_what_lies_below_it(name):
    rules = LAYERS[runtime_layer(name)]
    for dep in GRAPH[name]:
        if dep.startswith(RUNTIME + "."):
            rest = dep[len(RUNTIME) + 1 :]
            allowed = rest == "errors" or any(rest == m or rest.startswith(m + ".") for m in rules["may"])
            assert allowed, f"{name} ({runtime_layer(name)}) imports {dep}"
        elif dep.split(".")[0] in rules["never"]:
            raise AssertionError(f"{name} ({runtime_layer(name)}) imports {dep}")


def test_the_runtime_root_holds_only_the_package_and_its_errors():
    assert sorted(p.name for p in (ROOT / "runtime").glob("*.py")) == ["__init__.py", "errors.py"]
