"""ARCHITECTURE.md names every library file: each file under sgr_ext/, kernels/ and csrc/ is
named (by file name) in the section of its folder (a line starting with the folder in
backticks, e.g. `sgr_ext/ops/`; a subfolder without its own section belongs to its parent's)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("sgr_ext", "kernels", "csrc")


def _sections(text: str) -> dict[str, str]:
    sections, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^`((?:sgr_ext|kernels|csrc)(?:/\w+)*/)`", line)
        if m:
            current = m.group(1)
            sections[current] = ""
        elif line.startswith("## "):
            current = None
        if current is not None:
            sections[current] += line + "\n"
    return sections


def _library_files() -> list[str]:
    files = []
    for layer in LAYERS:
        for p in sorted((ROOT / layer).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".cpp", ".h", ".cu"):
                files.append(p.relative_to(ROOT).as_posix())
    return files


def unnamed_files(text: str) -> list[str]:
    sections = _sections(text)
    missing = []
    for path in _library_files():
        owners = [s for s in sections if path.startswith(s)]
        if not owners:
            missing.append(path)
            continue
        section = sections[max(owners, key=len)]
        if not re.search(r"(?<![\w.])" + re.escape(Path(path).name) + r"(?![\w.])", section):
            missing.append(path)
    return missing


def test_architecture_md_names_every_library_file():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert _library_files(), "no library files found"
    assert unnamed_files(text) == []
