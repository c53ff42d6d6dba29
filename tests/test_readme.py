"""The README cannot drift: its Python examples run as written against the test broker, in a room of three, and
`pip install .` gives an importable rtchat."""
import re
import shutil
import subprocess
import sys

from support import ROOT, cli_env, rtchat_cmd

import rtchat

BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2 and any(b.startswith("# contrib/") for b in BLOCKS)


def test_plugin_examples_load_as_plugins(tmp_path):
    for block in (b for b in BLOCKS if b.startswith("# contrib/")):
        name = block.splitlines()[0].removeprefix("# contrib/").strip()
        (tmp_path / name).write_text(block)
    registry = rtchat.Registry()
    loaded, skipped = rtchat.load_plugins(registry, [tmp_path])
    assert not skipped and len(loaded) == len(list(tmp_path.glob("*.py")))
    assert registry.commands and registry.questions and registry.hooks


def test_library_examples_run_as_written(broker, tmp_path):
    """Each example runs as a script in a room with alice (taking files, answering /ask time with contrib/clock.py)
    and bob, every rtchat on the local broker through the environment."""
    env = cli_env(broker.url, PYTHONPATH=str(ROOT), RTCHAT_STATE=str(tmp_path / "example.json"))
    peers = [subprocess.Popen(rtchat_cmd(name, "--room", "ops", "--state", str(tmp_path / f"{name}.json"), "--listen",
                                         *extra), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name, extra in (("alice", ["--files", str(tmp_path / "alice-files")]), ("bob", []))]
    (tmp_path / "build.log").write_text("build 42: all green\n")
    try:
        examples = [b for b in BLOCKS if not b.startswith("# contrib/")]
        assert examples
        for number, block in enumerate(examples):
            script = tmp_path / f"example{number}.py"
            script.write_text(block)
            result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=90, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, f"README example {number}:\n{block}\n{result.stderr}"
        assert (tmp_path / "alice-files" / "build.log").read_text() == "build 42: all green\n"
    finally:
        for p in peers:
            p.terminate()
    outs = [p.communicate(timeout=30)[0] for p in peers]
    assert all("deploy-bot: deploy finished" in out for out in outs), outs
    welcomed = [f"greeter: welcome, {name}" in out for name, out in zip(("alice", "bob"), outs, strict=True)]
    assert all(welcomed), outs  # the greeter's hook, run by rtchat.Plugins


def test_pip_install_gives_an_importable_module(tmp_path):
    """Built and installed as pip does it (without the network: build isolation off), then imported elsewhere."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("rtchat.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                             "--disable-pip-version-check", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = subprocess.run([sys.executable, "-c", "import rtchat; print(rtchat.__version__, rtchat.__file__)"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    version, path = probe.stdout.split()
    assert version == rtchat.__version__ and path.startswith(str(target))
    assert (target / "bin" / "rtchat").exists()


def test_declared_dependencies_are_requirements_txt():
    requirements = (ROOT / "requirements.txt").read_text().split()
    pyproject = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    inline = re.search(r'^# dependencies = \[(.*?)\]', (ROOT / "rtchat.py").read_text(), re.MULTILINE)
    for declared in (pyproject, inline):
        assert re.findall(r'"([^"]+)"', declared.group(1)) == requirements
