"""The web page in a real headless browser (Chromium from the Debian packages, driven by Selenium): after
three submissions (one refused), a publication and a withdrawal it shows members, admission reports with the
refusal's reason, versions, the withdrawal and the log. Writes the docs' screenshot (docs/images/service.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service_support import RunningService, missing_service, submit_now

from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.registry import add_member, initialise, withdraw
from flexolmo.service.versions import publish

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "service.png"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1500"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def populated(url: str, anchor, keys, packages, store):
    engine = open_engine(url)
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, anchor, store, keys / "coordinator.key"))
    members = {n: in_transaction(engine, lambda s, n=n: add_member(s, n, keys / f"{n}.pub"))
               for n in ("code", "math", "hostile")}
    for name, member in members.items():
        submit_now(engine, member, packages[name], {"licence": "Apache-2.0"} if name == "code" else None)
    publish(engine)
    in_transaction(engine, lambda s: withdraw(s, members["math"], "math"))
    return engine


def test_the_page_shows_members_reports_versions_withdrawals_and_the_log(tmp_path, tiny_anchor, service_keys,
                                                                        service_packages):
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        missing_service("Chromium and chromedriver (Debian packages chromium, chromium-driver) are not installed")
    from selenium.webdriver.common.by import By

    engine = populated(f"sqlite:///{tmp_path / 'db'}", tiny_anchor, service_keys, service_packages,
                       tmp_path / "store")
    service, driver = RunningService(engine), browser()
    try:
        driver.get(service.url + "/")
        assert driver.title == "FlexOlmo consortium"

        def rows(table: str) -> list[str]:
            return [row.text for row in driver.find_elements(By.CSS_SELECTOR, f"#{table} tr")[1:]]

        assert [r.split()[0] for r in rows("members")] == ["code", "hostile", "math"]
        submissions = rows("submissions")
        assert "hostile" in submissions[2] and "refused" in submissions[2] and "router rows are" in submissions[2]
        assert submissions[0].endswith("Apache-2.0")
        assert "withdrawn" in rows("versions")[0] and "code, math" in rows("versions")[0]
        assert rows("withdrawals")[0].startswith("math")
        assert any("withdrawal" in row for row in rows("log"))
        update = os.environ.get("FLEXOLMO_UPDATE_SCREENSHOT") == "1"
        assert driver.save_screenshot(str(SCREENSHOT if update else tmp_path / "service.png"))
    finally:
        driver.quit()
        service.close()
