"""The README's main job: `hmmctl demo` on embedded defaults passes every step."""

import subprocess
import sys


def test_hmmctl_demo_passes() -> None:
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert "coherence violations: 0" in r.stdout
    for step in ("both devices mirror it", "migrate to device memory", "migrate_to_ram", "two devices contend",
                 "device-exclusive access", "munmap half", "a device stops answering"):
        assert step in r.stdout
