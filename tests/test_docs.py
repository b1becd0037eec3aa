"""The docs tell the truth about the tree: the architecture page lists every module (and
only modules that exist), every relative link resolves, no two modules import each
other (the dependency rule of docs/architecture.md), and every documented `bpnet` or
`python scripts/...` command names a subcommand and options that exist."""

import ast
import itertools
import re

from conftest import REPO

PACKAGE = REPO / "bpnet"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _layout_paths():
    """Paths named in the ``bpnet/`` block of docs/architecture.md's Layout section."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    stack, found, inside = [], set(), False
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if indent == 0:
            inside = name == "bpnet/"
            stack = [(0, "bpnet")]
            continue
        if not inside or not (name.endswith(".py") or name.endswith("/")):
            continue  # a wrapped description line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([p for _, p in stack] + [name.rstrip("/")])
        found.add(path)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    return found


def test_architecture_page_lists_exactly_the_modules():
    listed = _layout_paths()
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    # A subpackage's __init__.py may go unlisted when the package itself is.
    unlisted = {m for m in modules - listed
                if not (m.endswith("/__init__.py") and m.rsplit("/", 1)[0] in listed)}
    assert not unlisted, f"modules missing from docs/architecture.md: {sorted(unlisted)}"
    ghosts = sorted(p for p in listed if not (REPO / p).exists())
    assert not ghosts, f"docs/architecture.md names files that do not exist: {ghosts}"


def _anchors(md: str):
    out = set()
    for heading in re.findall(r"^#+ (.+)$", md, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for page in DOCS:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, name, modules):
    """bpnet modules imported anywhere in the file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from . import x" imports the module x, not the package
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_two_modules_import_each_other():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    deps = {m: (_imports(p, m, files) & set(files)) - {m} for m, p in files.items()}
    mutual = [(a, b) for a, b in itertools.combinations(sorted(files), 2)
              if b in deps[a] and a in deps[b]]
    assert not mutual, f"modules that import each other: {mutual}"


# ------------------------------------------------------------------ documented commands

def _command_lines(text):
    """Shell lines of the code blocks (continuations joined) and inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def _invocations(line, program):
    """(name, arguments) of each ``program NAME ...`` command of a shell line: ``bpnet``
    subcommands, or ``python scripts/NAME.py`` scripts."""
    for seg in re.split(r"&&|\|\||[|;]", line):
        seg = seg.strip().removeprefix("$ ")
        m = re.match(r"(?:timeout \d+ )?" + program + r"\s+(\S+)(.*)", seg)
        if m:
            yield m.group(1), m.group(2)


def _options_used(args):
    import shlex
    try:
        tokens = shlex.split(args, comments=True)
    except ValueError:  # an unbalanced quote in prose
        tokens = args.split()
    return {t.split("=", 1)[0] for t in tokens if re.match(r"--?[A-Za-z]", t)}


def _doc_uses(program):
    for page in DOCS:
        for line in _command_lines(page.read_text()):
            for name, args in _invocations(line, program):
                yield page.name, name, _options_used(args), line.strip()


def test_documented_bpnet_commands_use_real_subcommands_and_options():
    from bpnet.cli import main
    bad, checked = [], 0
    for page, sub, used, line in _doc_uses("bpnet"):
        if not re.fullmatch(r"[a-z_]+", sub):
            continue  # bpnet --version, placeholders (TASK, <task>), quoted errors (export:)
        checked += 1
        cmd = main.commands.get(sub)
        if cmd is None:
            bad.append(f"{page}: no subcommand {sub!r}: {line}")
            continue
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts} | {"--help"}
        bad += [f"{page}: bpnet {sub} has no {o}: {line}" for o in sorted(used - known)]
    assert checked > 50, f"only {checked} documented bpnet commands found: is the parsing broken?"
    assert not bad, "\n".join(bad)


def test_documented_script_commands_use_real_options():
    import subprocess
    import sys
    helps, bad, checked = {}, [], 0
    for page, script, used, line in _doc_uses(r"python3?"):
        if not script.startswith("scripts/") or not script.endswith(".py"):
            continue
        checked += 1
        if not (REPO / script).exists():
            bad.append(f"{page}: no script {script}: {line}")
            continue
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, script, "--help"], cwd=REPO,
                                           capture_output=True, text=True, timeout=120).stdout
        known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", helps[script]))
        bad += [f"{page}: {script} has no {o}: {line}" for o in sorted(used - known)]
    assert checked > 20, f"only {checked} documented script commands found: is the parsing broken?"
    assert not bad, "\n".join(bad)
