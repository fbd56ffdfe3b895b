"""The method files share code in `# --- shared: NAME ---` ... `# --- end shared: NAME ---` regions, kept
byte-identical. The master copy of a region is the first of clip.py, nclip.py, xclip.py that has it. A
line a method must change inside shared code carries a trailing `# <method>:` comment (`# nclip: ...`);
every other difference is drift, and this test fails with the diff.

    python tests/test_sync.py          # report drift
    python tests/test_sync.py --fix    # copy each master region over its untagged copies
"""

import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["clip.py", "nclip.py", "xclip.py"]
START = re.compile(r"^# --- shared: (\S+) ---$")


def regions(text):
    """{name: (first line, last line, [lines])} of the shared regions in a file's text."""
    lines, out, i = text.splitlines(), {}, 0
    while i < len(lines):
        match = START.match(lines[i])
        if match:
            name = match.group(1)
            end = lines.index(f"# --- end shared: {name} ---", i)
            if name in out:
                raise ValueError(f"region {name!r} appears twice")
            out[name] = (i + 1, end, lines[i + 1 : end])
            i = end
        i += 1
    return out


def drift(master, copy, method):
    """Diff lines of `copy` against `master` that are not allowed: any line added or changed in the
    copy that does not carry the trailing `# <method>:` tag, and any master line dropped without a
    tagged replacement."""
    bad = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=master, b=copy, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        added = copy[b0:b1]
        if op == "delete" or any(f"# {method}:" not in line for line in added):
            bad.extend(difflib.unified_diff(master[a0:a1], added, lineterm="", n=0))
    return bad


def check(root=ROOT):
    """-> list of human-readable problems (empty: in sync)."""
    texts = {f: open(os.path.join(root, f)).read() for f in FILES if os.path.exists(os.path.join(root, f))}
    parsed = {f: regions(t) for f, t in texts.items()}
    problems, masters = [], {}
    for f in texts:
        for name, (_, _, lines) in parsed[f].items():
            masters.setdefault(name, (f, lines))
    for name, (master_file, master) in masters.items():
        for f in texts:
            if f == master_file or name not in parsed[f]:
                continue
            bad = drift(master, parsed[f][name][2], f[:-3])
            if bad:
                problems.append(f"{f}: shared region {name!r} drifted from {master_file}:\n" + "\n".join(bad))
    return problems


def fix(root=ROOT):
    """Overwrite each untagged copy of a region with its master copy."""
    texts = {f: open(os.path.join(root, f)).read() for f in FILES if os.path.exists(os.path.join(root, f))}
    masters = {}
    for f, t in texts.items():
        for name, (_, _, lines) in regions(t).items():
            masters.setdefault(name, lines)
    for f, t in texts.items():
        lines = t.splitlines()
        for name, (start, end, copy) in sorted(regions(t).items(), key=lambda r: -r[1][0]):
            if any(f"# {f[:-3]}:" in line for line in copy):
                print(f"{f}: region {name!r} has tagged lines; merge it by hand")
            elif copy != masters[name]:
                lines[start:end] = masters[name]
                print(f"{f}: region {name!r} updated")
        with open(os.path.join(root, f), "w") as out:
            out.write("\n".join(lines) + "\n")


def test_shared_regions_are_in_sync():
    problems = check()
    assert not problems, "\n\n".join(problems)


def test_every_method_file_has_the_common_regions():
    for f in FILES:
        if os.path.exists(os.path.join(ROOT, f)):
            names = set(regions(open(os.path.join(ROOT, f)).read()))
            assert {"config", "towers", "distributed", "training"} <= names, f


def test_drift_is_detected_and_tags_are_allowed(tmp_path):
    master = open(os.path.join(ROOT, "clip.py")).read()
    region = regions(master)["training"]
    copy = master.splitlines()
    copy[region[0] + 3] += "  # nclip: a tagged change is allowed"
    (tmp_path / "clip.py").write_text(master)
    (tmp_path / "nclip.py").write_text("\n".join(copy) + "\n")
    assert check(str(tmp_path)) == []
    copy[region[0] + 5] += "  # an untagged change is drift"
    (tmp_path / "nclip.py").write_text("\n".join(copy) + "\n")
    problems = check(str(tmp_path))
    assert len(problems) == 1 and "an untagged change is drift" in problems[0]
    del copy[region[0] + 7]  # a dropped line is drift too
    copy[region[0] + 5] = copy[region[0] + 5].replace("  # an untagged change is drift", "")
    (tmp_path / "nclip.py").write_text("\n".join(copy) + "\n")
    assert len(check(str(tmp_path))) == 1


if __name__ == "__main__":
    if "--fix" in sys.argv:
        fix()
    problems = check()
    print("\n\n".join(problems) if problems else "shared regions in sync")
    sys.exit(1 if problems else 0)
