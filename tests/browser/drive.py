"""Drive the SPM tab in Chromium through Playwright (run by .venv-ui's Python, not pytest).

    .venv-ui/bin/python tests/browser/drive.py --url http://127.0.0.1:PORT/ --result out.json [--shots DIR]

Trains an SPM on the shapes world for a few steps, watches the status and the loss plot, finds the
file in Manage, compresses it in Merge, renames it (a hostile name first), deletes it through the
confirm dialog, and shows the remaining file's gates for two prompts in the Test panel. Every step is written to the result JSON as it ends, so a failure says where;
the exit code is 0 only when every step passed. Every wait has a timeout: nothing hangs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_MS = 60_000  # clicks, fills and ordinary waits
TRAIN_MS = 600_000  # a few steps on a busy 2-core CPU, previews included: 281 s seen at load 10
ITERATIONS = 4


class Result:
    def __init__(self, path: Path):
        self.path = path
        self.data = {"ok": False, "steps": [], "screenshots": [], "dialogs": [], "error": None, "notes": {}}
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))

    @contextmanager
    def step(self, name: str):
        t0 = time.monotonic()
        entry = {"name": name, "ok": False}
        self.data["steps"].append(entry)
        try:
            yield entry
            entry["ok"] = True
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 1)
            self.save()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--shots", required=True, help="folder for the screenshots")
    args = ap.parse_args()
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    res = Result(Path(args.result))

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=STEP_MS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(STEP_MS)
        page.on("dialog", lambda d: (res.data["dialogs"].append(d.message), d.accept()))
        try:
            flow(page, res, shots, args.url)
            res.data["ok"] = True
        except Exception as e:  # record where and why, and what the page looked like
            res.data["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            try:
                page.screenshot(path=str(shots / "failure.png"), full_page=True)
                res.data["screenshots"].append(str(shots / "failure.png"))
            except Exception:
                pass
        finally:
            res.save()
            browser.close()
    return 0 if res.data["ok"] else 1


# -- helpers ---------------------------------------------------------------------------------------

def field(page, elem_id: str):
    """The text entry of a Textbox/Number component."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def open_tab(page, label: str) -> None:
    page.locator(".tab-nav button", has_text=re.compile(rf"^\s*{label}\s*$")).first.click()


def choose(page, elem_id: str, value: str) -> None:
    """Pick ``value`` in a (multiselect) Dropdown: focus its input, type, click the option."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f"#{elem_id} li[data-value='{value}'], #{elem_id} li:text-is('{value}')").first.click()
    box.press("Escape")


# A component's text and its first textarea's value, read in one JS call (never a locator that a
# re-render can leave unresolved); gradio 3 repeats an HTML component's id inside it: the first is the outer.
_TEXT_JS = """id => {
    const el = document.querySelector("#" + CSS.escape(id));
    if (!el) return "";
    const box = el.querySelector("textarea");
    return el.innerText + (box ? "\\n" + box.value : "");
}"""


def wait_text(page, elem_id: str, pattern: str, timeout: int = STEP_MS, absent: bool = False) -> str:
    """Wait until the component's text matches (or, with ``absent``, stops matching)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout / 1000
    text = ""
    while time.monotonic() < deadline:
        text = page.evaluate(_TEXT_JS, elem_id)
        if bool(rx.search(text)) != absent:
            return text
        page.wait_for_timeout(250)
    shown = "still shows" if absent else "never showed"
    raise TimeoutError(f"#{elem_id} {shown} {pattern!r}; it shows {text[-400:]!r}")


def table_names(page) -> list[str]:
    """The first column of Manage's table, read in one JS call: gradio re-renders the table at any
    moment, and per-cell locators taken before a re-render can wait forever on a row now gone."""
    cells = page.locator("#spm_manage_table tbody tr td:first-child")
    return cells.evaluate_all("cells => cells.map(c => c.innerText.trim())")


def wait_table(page, present: list[str] = (), absent: list[str] = (), timeout: int = STEP_MS) -> list[str]:
    deadline = time.monotonic() + timeout / 1000
    names: list[str] = []
    while time.monotonic() < deadline:
        names = table_names(page)
        if all(n in names for n in present) and not any(n in names for n in absent):
            return names
        page.wait_for_timeout(250)
    raise TimeoutError(f"Manage's table shows {names}; wanted {list(present)} and not {list(absent)}")


def shot(page, res: Result, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    res.data["screenshots"].append(str(path))


# -- the flow --------------------------------------------------------------------------------------

def flow(page, res: Result, shots: Path, url: str) -> None:
    from lib_spm.world.presets import PRESETS

    with res.step("open the tab"):
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#spm_train_start").wait_for(state="visible")

    with res.step("train circle_test"):
        quick = "shapes world quick"
        if quick in PRESETS:
            choose(page, "spm_train_preset", quick)
            want = str(PRESETS[quick].config["iterations"])
            page.wait_for_function(
                "v => document.querySelector('#spm_train_iterations input').value === v", arg=want, timeout=STEP_MS)
        field(page, "spm_train_targets").fill("circle")
        field(page, "spm_train_iterations").fill(str(ITERATIONS))
        field(page, "spm_train_name").fill("circle_test")
        page.locator("#spm_train_start").click()
        text = wait_text(page, "spm_train_status", r"running|done|failed|Not started", TRAIN_MS)
        if re.search("failed|Not started", text):
            raise AssertionError(f"training did not start: {text!r}")
        if "done" not in text:
            res.data["notes"]["seen_mid_run"] = text.strip()
        text = wait_text(page, "spm_train_status", r"\bdone\b|failed|cancelled", TRAIN_MS)
        if not re.search(rf"\bdone\b.*step {ITERATIONS}/{ITERATIONS}", text, re.S):
            raise AssertionError(f"training did not end done at step {ITERATIONS}: {text!r}")
        page.locator("#spm_train_loss canvas, #spm_train_loss svg").first.wait_for(state="visible")
        res.data["notes"]["train_status"] = text.strip()
        res.data["notes"]["previews"] = page.locator("#spm_train_previews img").count()
        shot(page, res, shots, "train")

    with res.step("the new file is in Manage"):
        open_tab(page, "Manage")
        wait_table(page, present=["circle_test"])
        choose(page, "spm_manage_select", "circle_test")
        page.wait_for_function("() => document.querySelector('#spm_manage_new_name textarea, "
                               "#spm_manage_new_name input').value === 'circle_test'", timeout=STEP_MS)
        wait_text(page, "spm_manage_details", "circle")
        shot(page, res, shots, "manage")

    with res.step("merge: compress circle_test to rank 1"):
        open_tab(page, "Merge")
        choose(page, "spm_merge_inputs", "circle_test")
        page.locator("#spm_merge_method label", has_text="Compressed to a rank").click()
        field(page, "spm_merge_rank").fill("1")
        field(page, "spm_merge_name").fill("circle_small")
        page.locator("#spm_merge_run").click()
        text = wait_text(page, "spm_merge_result", r"Wrote circle_small|Error", STEP_MS)
        if "Wrote circle_small" not in text:
            raise AssertionError(f"the merge failed: {text!r}")
        res.data["notes"]["merge_result"] = text.strip()
        shot(page, res, shots, "merge")

    with res.step("a hostile name is refused"):
        open_tab(page, "Manage")
        wait_table(page, present=["circle_test", "circle_small"])
        page.wait_for_function("() => document.querySelector('#spm_manage_new_name textarea, "
                               "#spm_manage_new_name input').value === 'circle_test'", timeout=STEP_MS)
        field(page, "spm_manage_new_name").fill("../x")
        page.locator("#spm_manage_rename").click()
        res.data["notes"]["hostile_message"] = wait_text(page, "spm_manage_message", r"\.\.").strip()
        wait_table(page, present=["circle_test"])

    with res.step("rename to circle_renamed"):
        field(page, "spm_manage_new_name").fill("circle_renamed")
        page.locator("#spm_manage_rename").click()
        wait_table(page, present=["circle_renamed"], absent=["circle_test"])
        res.data["notes"]["rename_message"] = wait_text(page, "spm_manage_message", r"circle_renamed").strip()

    with res.step("delete circle_renamed through the confirm dialog"):
        dialogs = len(res.data["dialogs"])
        page.locator("#spm_manage_delete").click()
        wait_table(page, present=["circle_small"], absent=["circle_renamed"])
        if len(res.data["dialogs"]) != dialogs + 1 or "circle_renamed" not in res.data["dialogs"][-1]:
            raise AssertionError(f"no confirm dialog naming the file: {res.data['dialogs']}")
        res.data["notes"]["delete_message"] = page.evaluate(_TEXT_JS, "spm_manage_message").strip()

    with res.step("test: gates per prompt, before/after images"):
        open_tab(page, "Test")
        choose(page, "spm_test_spms", "circle_small")
        field(page, "spm_test_prompts").fill("a red circle\na blue square")
        page.locator("#spm_test_images input").check()
        page.locator("#spm_test_run").click()
        page.wait_for_function("() => document.querySelectorAll('#spm_test_table td[data-gate]').length === 2",
                               timeout=TRAIN_MS)
        gates = page.locator("#spm_test_table td[data-gate]").evaluate_all(
            "cells => cells.map(c => [c.dataset.gate, c.innerText.trim()])")
        res.data["notes"]["test_gates"] = gates
        page.wait_for_function("() => document.querySelectorAll('#spm_test_gallery img').length >= 4",
                               timeout=TRAIN_MS)
        res.data["notes"]["test_images"] = page.locator("#spm_test_gallery img").count()
        res.data["notes"]["test_table"] = page.evaluate(_TEXT_JS, "spm_test_table").strip()
        shot(page, res, shots, "test")


if __name__ == "__main__":
    sys.exit(main())
