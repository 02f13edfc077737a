"""Every relative link of the manual (docs/ and README.md) resolves: the file
exists and, for a Markdown file, so does the #anchor (GitHub's heading slugs)."""
import re
from pathlib import Path
from typing import List, Set

from .paths import REPO

ROOT = Path(REPO)
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def heading_anchors(path: Path) -> Set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code fences)."""
    found, seen, fenced = set(), {}, False
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.startswith('```'):
            fenced = not fenced
        match = None if fenced else re.match(r'#+\s+(.*)', line)
        if match:
            slug = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower()).replace(' ', '-')
            found.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path, root: Path = ROOT) -> List[str]:
    text = re.sub(r'```.*?```', '', page.read_text(encoding='utf-8'), flags=re.S)
    text = re.sub(r'`[^`\n]*`', '', text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f'{page.relative_to(root)}: {target}: no such file')
        elif anchor and resolved.suffix == '.md' and anchor not in heading_anchors(resolved):
            broken.append(f'{page.relative_to(root)}: {target}: no such heading')
    return broken


def test_every_relative_link_of_the_manual_resolves():
    pages = sorted(ROOT.glob('docs/**/*.md')) + [ROOT / 'README.md']
    broken = [line for page in pages for line in broken_links(page)]
    assert not broken, '\n'.join(broken)


def test_broken_links_and_headings_are_found(tmp_path):
    page = tmp_path / 'a.md'
    page.write_text('# A b\n[ok](a.md#a-b) [x](a.md#nope) [y](gone.md) `[z](gone.md)`\n')
    assert broken_links(page, tmp_path) == ['a.md: a.md#nope: no such heading',
                                            'a.md: gone.md: no such file']
