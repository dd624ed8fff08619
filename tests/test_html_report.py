"""attnproto report --html: the committed results' page renders in headless Chromium, every image loads.

Chromium is Debian's package (.ci/chromium_deps.sh). Outside CI the rendering test skips
where it is absent; CI sets CI_REQUIRE_CHROMIUM=1 and a missing Chromium fails it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="report --html needs matplotlib (the test extra)")

from attnproto import cli, html_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
#: Wall-clock limit for one headless render, and the virtual time Chromium gives the page to load.
CHROMIUM_TIMEOUT_S = 120
VIRTUAL_TIME_MS = 10000
MARKER_ID = "attnproto-render-check"
# Appended to a copy of the page (never to the report itself): after load, one element says how
# many images there are and which did not decode.
CHECK_SCRIPT = f"""
<script>
window.addEventListener('load', function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); }});
  var el = document.createElement('div');
  el.id = '{MARKER_ID}';
  el.textContent = 'images=' + imgs.length + ' broken=' + bad.length + ' h2=' + document.querySelectorAll('h2').length;
  document.body.appendChild(el);
}});
</script>
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / html_report.REPORT_FILE
    assert cli.main(["report", "--html", str(RESULTS), "--out", str(out)]) == cli.EXIT_OK
    return out


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    why = "headless Chromium is not installed (Debian: apt-get install chromium; CI: .ci/chromium_deps.sh)"
    if os.environ.get("CI_REQUIRE_CHROMIUM") == "1":
        pytest.fail(why)
    pytest.skip(why)


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    srcs = re.findall(r"<img [^>]*src='([^']+)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=['\"](?!data:)", text), "the page refers to another file"
    devices = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    for dev in devices:
        assert f"<h2>{dev}</h2>" in text
    for title, _, _ in html_report.PLOTS:
        assert text.count(f"<h3>{title} ") == len(devices)
    assert "proto1/best-tile-d128-n16384/96c9f55b94a9" in text       # the findings beside the plots


def test_page_renders_in_headless_chromium(page, tmp_path):
    browser = _chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", probe.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    m = re.search(rf'id="{MARKER_ID}">images=(\d+) broken=(\d+) h2=(\d+)<', res.stdout)
    assert m, f"the page did not finish loading in Chromium (rc {res.returncode}): {res.stderr[-2000:]}"
    images, broken, h2 = map(int, m.groups())
    expected = page.read_text(encoding="utf-8").count("<img ")
    assert images == expected > 0 and broken == 0 and h2 >= 1


def test_missing_results_dir(tmp_path):
    assert cli.main(["report", "--html", str(tmp_path / "absent")]) == cli.EXIT_USAGE
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "x.html")]) == cli.EXIT_USAGE
