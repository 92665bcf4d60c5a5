"""The runtime imports and runs in a process where importing torch fails."""

import json
import subprocess
import sys
import textwrap

from conftest import ROOT

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name in ("tensorrt",):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def run_without_torch(code: str, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(BLOCK_TORCH + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_runtime_segments_a_scan_without_torch(bundle_dir, phantom_dir, tmp_path):
    scan = phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"
    out = tmp_path / "seg.nii.gz"
    res = run_without_torch(
        f"""
        import imunet.runtime
        from imunet.runtime.app.cli import main
        sys.argv = ["imunet-run", "{scan}", "--model", "{bundle_dir}", "--out", "{out}", "--stats", "s.json"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        assert "torch" not in sys.modules and "imunet.model" not in sys.modules
        print("OK", sorted(m for m in sys.modules if m.startswith("imunet")))
    """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK" in res.stdout
    assert out.is_file()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["scans"][0]["ok"] and stats["backend"] in ("ort-cpu", "openvino")


def test_blocker_really_blocks(tmp_path):
    res = run_without_torch("import torch\n", tmp_path)
    assert res.returncode != 0 and "torch is blocked" in res.stderr
