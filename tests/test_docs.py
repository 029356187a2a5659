"""The documentation cannot rot: every Python block in README.md and docs/ runs, the site builds
strictly, and every name ``sdclr_fast`` exports has a docstring and an entry in the API reference.

A block that needs what a test machine lacks (a GPU, torchrun, a data root) is preceded by a
marker line that says why, and is reported as skipped with that reason::

    <!-- docs-test: skip: needs a CUDA GPU -->
    ```python
"""
import doctest
import html.parser
import importlib
import inspect
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import torch

import sdclr_fast

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(path):
    """[(first line number, language, code, skip reason or None)] of the fenced blocks in ``path``."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].lstrip())
        if not m:
            i += 1
            continue
        fence, lang, indent = m.group(1), m.group(2).lower(), len(lines[i]) - len(lines[i].lstrip())
        prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        reason = SKIP.search(prev)
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            j += 1
        code = "\n".join(ln[indent:] for ln in lines[i + 1:j])
        blocks.append((i + 1, lang, code, reason.group(1) if reason else None))
        i = j + 1
    return blocks


PYTHON_BLOCKS = [pytest.param(code, reason, id=f"{path.relative_to(ROOT)}:{line}")
                 for path in MARKDOWN for line, lang, code, reason in code_blocks(path)
                 if lang in ("python", "py")]


def run_block(code, namespace=None):
    """Run one block in a fresh namespace, as a reader pasting it into a new interpreter would."""
    torch.manual_seed(0)
    exec(compile(code, "<docs block>", "exec"), dict(namespace or {}, __name__="__docs__"))


@pytest.mark.parametrize("code, skip_reason", PYTHON_BLOCKS)
def test_python_block_runs(code, skip_reason, one_thread):
    if skip_reason:
        pytest.skip(skip_reason)
    run_block(code)


def test_the_block_finder_sees_markers_and_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- docs-test: skip: needs torchrun -->\n```python\nx = 1\n```\n\n"
                    "```bash\nmake test\n```\n\n  ```python\n  y = 2\n  ```\n", encoding="utf-8")
    assert code_blocks(page) == [(4, "python", "x = 1", "needs torchrun"), (8, "bash", "make test", None),
                                 (12, "python", "y = 2", None)]


def test_a_block_that_uses_an_undefined_name_fails():
    with pytest.raises(NameError):
        run_block("import torch\nloss = torch.randn(3).sum()\nloss2 = out0.sum()")


def shell_commands(code):
    """The logical lines of a shell block (continuations joined, comments dropped) as token lists."""
    for line in code.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote inside a comment
            tokens = shlex.split(line.split(" #", 1)[0])
        if tokens:
            yield tokens


def cli_arguments(tokens):
    """The arguments after ``sdclr-fast`` / ``-m sdclr_fast`` in a command line, or None."""
    for i, tok in enumerate(tokens):
        if tok == "sdclr-fast" or tok.endswith("/bin/sdclr-fast"):
            return tokens[i + 1:]
        if tok == "sdclr_fast" and i and tokens[i - 1] == "-m":
            return tokens[i + 1:]
    return None


SHELL_BLOCKS = [pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
                for path in MARKDOWN for line, lang, code, reason in code_blocks(path)
                if lang in ("bash", "sh", "shell") and not reason]
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_shell_block(code):
    """Every ``sdclr-fast`` command in a shell block parses with today's flags, every ``make``
    target exists and every script it runs is there, so a renamed flag breaks a test, not a reader."""
    from sdclr_fast.cli import build_parser

    for tokens in shell_commands(code):
        args = cli_arguments(tokens)
        if args is not None and "--help" not in args:
            if "..." in args:  # arguments left out: the flags given must still exist
                commands = build_parser()._subparsers._group_actions[0].choices
                known = commands[args[0]]._option_string_actions
                unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
                assert not unknown, f"sdclr-fast {args[0]}: unknown flags {unknown}"
                continue
            try:
                build_parser().parse_args(args)
            except SystemExit as exc:
                pytest.fail(f"sdclr-fast {' '.join(args)}: does not parse (exit {exc.code})")
        elif tokens[0] == "make":
            assert set(tokens[1:]) <= MAKE_TARGETS, f"{tokens}: no such make target"
        for tok in tokens:
            if re.fullmatch(r"(bench|tests)/[\w./-]+\.(py|sh)", tok):
                assert (ROOT / tok).exists(), f"{tok} does not exist"


@pytest.mark.parametrize("code", SHELL_BLOCKS)
def test_shell_block_commands_parse(code):
    check_shell_block(code)


def test_a_renamed_flag_or_target_fails_the_shell_check():
    check_shell_block("srun sdclr-fast pretrain --method sdclr \\\n    --run-dir runs/a   # a comment")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_shell_block("srun sdclr-fast pretrain --method sdclr \\\n    --run-dir runs/a --no-such-flag 3")
    with pytest.raises(AssertionError, match="unknown flags"):
        check_shell_block("torchrun -m sdclr_fast pretrain --no-such-flag 3 ...")
    with pytest.raises(AssertionError, match="no such make target"):
        check_shell_block("make demo-everything")
    check_shell_block("torchrun --nproc-per-node 8 -m sdclr_fast pretrain --method sdclr ...  # fine")


def test_relative_links_point_to_files():
    for path in MARKDOWN:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            target = target.split("#", 1)[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: dead link {target}"


def docstring_example(doc):
    """The code of the ``Example:`` (or ``Examples:``, ``Example::``) section of a docstring, or None."""
    m = re.search(r"^Examples?::?[ \t]*$", doc, re.M)
    if m is None:
        return None
    block = []
    for line in doc[m.end():].split("\n")[1:]:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() or None


def run_example(code, name, namespace=None):
    """A doctest (``>>>`` prompts, outputs compared) or a plain block (run), in a copy of
    ``namespace`` (the defining module's globals, as doctest gives them)."""
    if ">>>" not in code:
        return run_block(code, namespace)
    torch.manual_seed(0)
    test = doctest.DocTestParser().get_doctest(code, dict(namespace or {}, __name__="__docs__"), name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    result = runner.run(test, out=out.append)
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("name", sdclr_fast.__all__)
def test_export_has_a_docstring_whose_example_runs(name, one_thread):
    obj = getattr(sdclr_fast, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 80, f"sdclr_fast.{name} has no docstring (or a one-liner)"
    params = [p for p in inspect.signature(obj).parameters if not p.startswith("_")]
    if params and not inspect.isclass(obj) or (inspect.isclass(obj) and "Args:" in doc):
        assert "Args:" in doc, f"sdclr_fast.{name}'s docstring has no Args: section"
    code = docstring_example(doc)
    assert code, f"sdclr_fast.{name}'s docstring has no Example: section"
    run_example(code, f"sdclr_fast.{name}", vars(sys.modules[obj.__module__]))


def test_a_docstring_example_with_a_wrong_output_fails():
    code = docstring_example("Summary.\n\nExample:\n    >>> 1 + 1\n    3\n\nMore text.")
    assert code == ">>> 1 + 1\n3"
    with pytest.raises(AssertionError, match="Expected"):
        run_example(code, "wrong")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once with ``mkdocs build --strict`` (what ``make docs`` runs)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for key, value in attrs if key == "id")


@pytest.mark.slow
def test_site_builds_strictly_and_the_api_reference_covers_every_export(site):
    ids = set()
    for page in (site / "api").rglob("*.html"):
        parser = _Ids()
        parser.feed(page.read_text(encoding="utf-8"))
        ids |= parser.ids
    missing = []
    for name in sdclr_fast.__all__:
        obj = getattr(sdclr_fast, name)
        if f"{obj.__module__}.{obj.__qualname__}" not in ids:
            missing.append(name)
    assert not missing, f"no API reference entry for {missing}"
    # The public modules' own names are rendered too (their pages use show_submodules).
    for module in ("sdclr_fast.ops", "sdclr_fast.nn", "sdclr_fast.data", "sdclr_fast.eval", "sdclr_fast.train"):
        assert module in ids
    assert importlib.import_module("sdclr_fast").__version__ in (site / "index.html").read_text(encoding="utf-8")


def _browser_missing():
    import shutil

    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make setup installs it)"
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    return f"{' and '.join(missing)} not found (make docs-check installs Debian's chromium, chromium-driver)" \
        if missing else None


@pytest.mark.slow
def test_docs_check_finds_what_a_reader_would_see(tmp_path):
    """``make docs-check`` on a tiny site: a clean page passes; a missing image, a dead link, a
    missing anchor and a console error are each reported."""
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import check_site
    finally:
        sys.path.pop(0)
    site = tmp_path / "site"
    (site / "api" / "ops").mkdir(parents=True)
    icon = '<link rel="icon" href="data:,">'  # no favicon request (a built site has its own)
    (site / "index.html").write_text(icon + '<h1 id="top">home</h1><a href="api/ops/#ok">ops</a>')
    (site / "api" / "ops" / "index.html").write_text(icon + '<h2 id="ok">ops</h2><a href="../../#top">home</a>')
    assert check_site.check(site, tmp_path / "shots") == []
    assert (tmp_path / "shots" / "home.png").stat().st_size > 0
    (site / "index.html").write_text(icon + '<img src="nope.png"><a href="gone/">x</a><a href="api/ops/#missing">y</a>'
                                     '<script>console.error("boom")</script>')
    problems = "\n".join(check_site.check(site, None))
    for expected in ("image did not load: nope.png", "dead link gone/", "missing anchor api/ops/#missing",
                     "console error"):
        assert expected in problems


def test_every_doctest_in_a_docstring_sits_under_examples():
    """griffe renders ``>>>`` lines as code only inside an ``Examples:`` section; elsewhere (plain
    text, or Google's ``Example:``, which it reads as an admonition) they become nested block
    quotes, and an output such as ``[0.3, 0.2]`` a broken cross-reference."""
    griffe = pytest.importorskip("griffe")
    package = griffe.load("sdclr_fast", search_paths=[str(ROOT)], submodules=True)
    stray = []

    def walk(obj):
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.docstring:
                for section in member.docstring.parse("google", warnings=False):
                    text = getattr(section.value, "contents", section.value)
                    if section.kind.value in ("text", "admonition") and ">>>" in str(text):
                        stray.append(member.path)
            if member.is_module or member.is_class:
                walk(member)

    walk(package)
    assert not stray, f"doctests outside an 'Examples:' section: {stray}"


def test_readme_stays_short():
    """The README is what a newcomer reads in five minutes; the rest belongs in docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 12_000
