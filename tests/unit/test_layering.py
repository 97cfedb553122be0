"""DESIGN §Style: ``vistr/`` is the pure-PyTorch library; only ``pipelines/`` brings in Ray and MLflow."""

import ast
from pathlib import Path

import vistr

FORBIDDEN = ("ray", "mlflow", "pipelines")


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import in ``path``, function-level (lazy) imports included."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.partition(".")[0])
    return roots


def test_the_library_imports_no_ray_mlflow_or_pipelines_anywhere() -> None:
    files = sorted(Path(vistr.__file__).parent.rglob("*.py"))
    assert len(files) > 20  # the scan really sees the package
    offenders = {str(f.relative_to(Path(vistr.__file__).parent)): sorted(imported_roots(f) & set(FORBIDDEN))
                 for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_the_scan_sees_lazy_imports(tmp_path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os\ndef f():\n    from pipelines.model_source import load_model\n    import ray.data\n")
    assert imported_roots(sample) == {"os", "pipelines", "ray"}
