#!/usr/bin/python3
"""Drives the BootTorrent dashboard in headless Chromium, as an operator would.

Usage: dashboard_browser.py SERVER_URL ADMIN_TOKEN VIEWER_TOKEN IMAGE_ID STUCK_DEPLOYMENT
                            SCREENSHOT_PATH

The server has 33 machines: fake-00..fake-29 (registered, never progressing, zone `fakes`),
new-pc (made up too, waiting for approval) and pc-01, pc-02 (real agents, zone `lab`);
STUCK_DEPLOYMENT sends the image to the 30 fakes.

Opens the page and checks that it shows no fleet data before sign-in, that a wrong token is
refused with the API's message (HTTP 401) and the sign-in form comes back, that the viewer
token shows the fleet's counts and the machines a page of 25 at a time (Next, Previous), that
the count of machines waiting for approval leads to new-pc, that
the zone filter leaves the zone's machines, that a zone of 30 shows its count and 5 ids and
"25 more", that the stuck deployment shows 20 machine rows and
"10 more", and that a deployment with the viewer token is refused (HTTP 403). Then signs in
with the admin token, approves new-pc from the page, deploys IMAGE_ID (action stage) to the zone's machines by typing their
ids into the form (an unknown id first, which the server refuses by name), and waits until the
page shows each of them `staged` in the deployment and holding the image in the machines table,
and the image filter leaves exactly them. Everything is read from the page's
DOM, never from the API: the point is that the page shows what happens. Prints
`deployment <id>` and exits 0; on any failure prints why, the page's visible error text and
the browser's console log, and exits 1. The screenshot is saved either way.

Run by tests/dashboard.rs with the system python (/usr/bin/python3) and Debian's
chromium, chromium-driver and python3-selenium, which scripts/test installs.
"""

import os
import re
import sys
import time
import traceback

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Machines need a few seconds for a small image; the rest is slack for a loaded CI machine.
STAGED_WITHIN_SECS = 90
PAGE_READY_SECS = 30


class Failure(Exception):
    """A check on the page failed; the message says which."""


def wait(what, secs, check, interval=0.2):
    """Calls check() until it returns something truthy; raises Failure after secs."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + secs
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            # The page re-rendered between finding an element and reading it (live updates
            # replace rows): look again.
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {secs} s waiting for {what}")
        time.sleep(interval)


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # CI runs as root, where Chromium's sandbox cannot start; /dev/shm may be tiny in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    # Keeps the console's messages for the failure report.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def error_banner(driver):
    """The page's error message, if one is shown."""
    from selenium.webdriver.common.by import By

    if not driver.find_element(By.ID, "error").is_displayed():
        return ""
    return driver.find_element(By.ID, "error-text").text.strip()


FLEET = 33
PAGE = 25
ZONE = "lab"
WAITING = "new-pc"


def drive(driver, url, token, viewer, image, stuck):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    css = driver.find_elements
    driver.get(url.rstrip("/") + "/")

    def sign_in(value):
        driver.find_element(By.ID, "token-input").send_keys(value)
        driver.find_element(By.ID, "token-save").click()

    # Nothing of the fleet before sign-in: the data sections are hidden and empty.
    wait("the sign-in form", PAGE_READY_SECS,
         lambda: driver.find_element(By.ID, "token-form").is_displayed())
    if driver.find_element(By.ID, "main").is_displayed() or css(By.CSS_SELECTOR, "tr[data-machine]"):
        raise Failure("the page shows fleet data before sign-in")

    # A wrong token: the page must show the API's refusal and ask for the token again.
    sign_in("not-a-token-of-this-server")
    refusal = wait("the page to show the refused token", 10, lambda: error_banner(driver))
    wait("the sign-in form to come back", 10,
         lambda: driver.find_element(By.ID, "token-form").is_displayed())
    if "HTTP 401" not in refusal or driver.find_element(By.ID, "main").is_displayed():
        raise Failure(f"a refused token should show the API's 401 and hide the fleet: {refusal!r}")
    print(f"wrong token refused: {refusal}", flush=True)

    # The viewer token reads (the live stream connects) but cannot deploy.
    sign_in(viewer)
    wait("the live event stream to connect with the viewer token (#conn live)", PAGE_READY_SECS,
         lambda: driver.find_element(By.ID, "conn").get_attribute("data-state") == "open")

    def shown_ids():
        return [row.get_attribute("data-machine")
                for row in css(By.CSS_SELECTOR, "#machines-table tr[data-machine]")]

    def page_shows(number, count, first):
        """The pager says page `number` and the table has `count` rows starting at `first`."""
        def check():
            ids = shown_ids()
            info = driver.find_element(By.ID, "page-info").get_attribute("data-page")
            return info == str(number) and len(ids) == count and ids[0] == first and ids
        return check

    def choose(select, value):
        Select(driver.find_element(By.ID, select)).select_by_value(value)

    # The counts come from the server's tally, not from a list of every machine.
    wait(f"the counts to show {FLEET} machines", PAGE_READY_SECS, lambda: css(
        By.CSS_SELECTOR, f'#fleet-counts [data-count="machines"][data-n="{FLEET}"]'))
    # A page at a time, in id order: 25 made-up machines, then the other 7.
    choose("page-size", str(PAGE))
    first = wait("the first page of 25", PAGE_READY_SECS, page_shows(1, PAGE, "fake-00"))
    if "pc-01" in first or not driver.find_element(By.ID, "page-prev").get_property("disabled"):
        raise Failure(f"page 1 should start the list and have no previous page: {first}")
    driver.find_element(By.ID, "page-next").click()
    second = wait("the second page", PAGE_READY_SECS, page_shows(2, FLEET - PAGE, "fake-25"))
    if second[-2:] != ["pc-01", "pc-02"] or not driver.find_element(By.ID, "page-next").get_property("disabled"):
        raise Failure(f"page 2 should end the list with pc-01, pc-02 and have no next page: {second}")
    driver.find_element(By.ID, "page-prev").click()
    wait("the first page again", PAGE_READY_SECS, page_shows(1, PAGE, "fake-00"))
    print(f"machines paged: {len(first)} + {len(second)}", flush=True)

    # The count of machines waiting for approval leads to them.
    def show_waiting():
        wait("the counts to show 1 machine waiting", PAGE_READY_SECS, lambda: css(
            By.CSS_SELECTOR, '#fleet-counts [data-count="waiting"][data-n="1"]'))
        driver.find_element(By.ID, "show-waiting").click()
        wait(f"{WAITING} listed as waiting", PAGE_READY_SECS, lambda: shown_ids() == [WAITING])
        if Select(driver.find_element(By.ID, "filter-key")).first_selected_option.get_attribute("value") != "pending":
            raise Failure("the waiting machines should be shown by the key filter")

    show_waiting()
    choose("filter-key", "")

    # Filtered on the server: the zone's two machines, both online.
    def online_machines():
        rows = css(By.CSS_SELECTOR, '#machines-table tr[data-machine][data-online="true"]')
        ids = [row.get_attribute("data-machine") for row in rows]
        return ids if ids == shown_ids() and len(ids) == 2 else None

    def show_zone():
        choose("filter-zone", ZONE)
        return wait(f"the zone filter to show {ZONE}'s two machines online", PAGE_READY_SECS,
                    online_machines)

    wait(f"zone {ZONE} offered as a filter", PAGE_READY_SECS,
         lambda: css(By.CSS_SELECTOR, f'#filter-zone option[value="{ZONE}"]'))
    machines = show_zone()
    if machines != ["pc-01", "pc-02"]:
        raise Failure(f"zone {ZONE} should show pc-01, pc-02: {machines}")
    wait(f"zone {ZONE} counted with 2 members", PAGE_READY_SECS, lambda: css(
        By.CSS_SELECTOR, f'#zones-table tr[data-zone="{ZONE}"][data-members="2"]'))
    # A zone of 30: its count, its first five ids and how many more, not 30 ids.
    fakes = wait("zone fakes counted with 30 members", PAGE_READY_SECS, lambda: css(
        By.CSS_SELECTOR, '#zones-table tr[data-zone="fakes"][data-members="30"] td'))
    for shown in (fakes[1].text, fakes[4].text):  # the ids listed, the members
        if "fake-04 … 25 more" not in shown or "fake-05" in shown:
            raise Failure(f"zone fakes should show 5 ids and 25 more: {shown!r}")
    print(f"zone filter: {machines}", flush=True)

    # A deployment of 30 machines shows the first 20 and says how many more.
    def stuck_rows():
        rows = css(By.CSS_SELECTOR, f'#deployment-list [data-deployment="{stuck}"] tr[data-machine]')
        more = css(By.CSS_SELECTOR, f'#deployment-list [data-deployment="{stuck}"] tr[data-more="10"]')
        return len(rows) == 20 and more
    wait("the 30-machine deployment to show 20 rows and 10 more", PAGE_READY_SECS, stuck_rows)
    # Nothing of it moves, so no time left can be told (not "0 s").
    eta = driver.find_element(By.CSS_SELECTOR, f'#deployment-list [data-deployment="{stuck}"] .eta').text
    if eta != "ETA –":
        raise Failure(f"a deployment where nothing downloads should show no ETA: {eta!r}")
    # Each machine's key is shown by the fingerprint its agent logs, for comparing by eye.
    for machine in machines:
        shown = css(By.CSS_SELECTOR, f'#machines-table tr[data-machine="{machine}"] .fingerprint')
        if not shown or not shown[0].text.startswith("SHA256:"):
            raise Failure(f"no key fingerprint shown for {machine}")
    wait(f"image {image} offered in the deploy form", PAGE_READY_SECS,
         lambda: css(By.CSS_SELECTOR, f'#deploy-image option[value="{image}"]'))

    def fill_form(ids):
        Select(driver.find_element(By.ID, "deploy-image")).select_by_value(image)
        typed = driver.find_element(By.ID, "deploy-machines")
        typed.clear()
        typed.send_keys(ids)
        if not driver.find_element(
                By.CSS_SELECTOR, 'input[name="target-kind"][value="machines"]').is_selected():
            raise Failure("typing machine ids should choose the machines target")
        Select(driver.find_element(By.ID, "deploy-action")).select_by_value("stage")

    fill_form(", ".join(machines))
    driver.find_element(By.ID, "deploy-submit").click()
    forbidden = wait("the page to show the viewer's refused deployment", 10,
                     lambda: error_banner(driver))
    if "HTTP 403" not in forbidden:
        raise Failure(f"a deployment with the viewer token should show the API's 403: {forbidden!r}")
    if not driver.find_element(By.ID, "main").is_displayed():
        raise Failure("a 403 should leave the viewer signed in")
    print(f"viewer's deployment refused: {forbidden}", flush=True)

    driver.find_element(By.ID, "token-clear").click()
    wait("the sign-in form after signing out", 5,
         lambda: driver.find_element(By.ID, "token-form").is_displayed())
    sign_in(token)
    wait("the live event stream to connect with the admin token (#conn live)", PAGE_READY_SECS,
         lambda: driver.find_element(By.ID, "conn").get_attribute("data-state") == "open")
    if error_banner(driver):
        raise Failure(f"a refusal is still shown after signing in again: {error_banner(driver)}")
    # Approved from the page, by the fingerprint it shows (the confirm dialog accepted).
    show_waiting()
    driver.find_element(By.CSS_SELECTOR, f'#machines-table [data-approve="{WAITING}"]').click()
    wait("the approval's confirm dialog", 5, lambda: driver.switch_to.alert).accept()
    wait(f"{WAITING} gone from the waiting machines", PAGE_READY_SECS, lambda: not shown_ids() and css(
        By.CSS_SELECTOR, '#fleet-counts [data-count="waiting"][data-n="0"]'))
    print(f"{WAITING} approved from the page", flush=True)
    choose("filter-key", "")

    wait(f"zone {ZONE} offered as a filter", PAGE_READY_SECS,
         lambda: css(By.CSS_SELECTOR, f'#filter-zone option[value="{ZONE}"]'))
    machines = show_zone()
    wait(f"image {image} offered in the deploy form", PAGE_READY_SECS,
         lambda: css(By.CSS_SELECTOR, f'#deploy-image option[value="{image}"]'))
    # The ids are checked by the server: an unknown one is refused by name, nothing deployed.
    fill_form(f"{machines[0]} pc-99")
    driver.find_element(By.ID, "deploy-submit").click()
    unknown = wait("the page to show the unknown machine refused", 10, lambda: error_banner(driver))
    if "pc-99" not in unknown:
        raise Failure(f"a deployment to an unknown machine should name it: {unknown!r}")
    print(f"unknown machine refused: {unknown}", flush=True)
    driver.find_element(By.ID, "error-close").click()
    fill_form(" ".join(machines))
    driver.find_element(By.ID, "deploy-submit").click()

    def created():
        shown = error_banner(driver)
        if shown:
            raise Failure(f"the page shows an error after Deploy: {shown}")
        return driver.find_element(By.ID, "deploy-form").get_attribute("data-last-deployment")

    deployment = wait("the page to show the new deployment's id", 15, created)
    print(f"deployment {deployment}", flush=True)

    def staged():
        states = {}
        for machine in machines:
            rows = css(By.CSS_SELECTOR,
                       f'#deployment-list [data-deployment="{deployment}"] tr[data-machine="{machine}"]')
            states[machine] = rows[0].get_attribute("data-state") if rows else "absent"
            if states[machine] == "failed":
                raise Failure(f"{machine} failed: {rows[0].text}")
        print(f"  page shows {states}", flush=True)
        return all(s == "staged" for s in states.values())

    wait(f"the page to show {', '.join(machines)} staged", STAGED_WITHIN_SECS, staged, interval=1)
    wait("the page to show the deployment completed", 15, lambda: driver.find_element(
        By.CSS_SELECTOR, f'#deployment-list [data-deployment="{deployment}"]'
    ).get_attribute("data-state") == "completed")

    # The machines table shows the image held, from the agents' heartbeats (polled).
    def held():
        return all(css(By.CSS_SELECTOR,
                       f'#machines-table tr[data-machine="{machine}"] .held[data-image="{image}"]'
                       ':is([data-state="staged"], [data-state="seeding"])')
                   for machine in machines)

    wait("the machines table to show the image held by both machines", 20, held, interval=0.5)

    # Every machine that holds the image, whatever its zone: exactly these two.
    choose("filter-zone", "")
    choose("filter-image", image)
    holders = wait("the image filter to leave the two machines", PAGE_READY_SECS,
                   lambda: shown_ids() == machines and shown_ids())
    print(f"image filter: {holders}", flush=True)

    # Nothing on the page is a value the script failed to have.
    text = driver.find_element(By.TAG_NAME, "body").text
    broken = re.findall(r".{0,40}(?:undefined|null|NaN|\[object Object\]).{0,40}", text)
    if broken:
        raise Failure(f"the page shows a missing value: {broken}")


def report(driver):
    """What an engineer needs to see why the page did not get there."""
    try:
        print(f"page error banner: {error_banner(driver) or '(none)'}")
        print("page text:\n" + driver.find_element("tag name", "body").text[:4000])
    except Exception as e:  # the page itself may be gone
        print(f"could not read the page: {e}")
    try:
        print("browser console:")
        for entry in driver.get_log("browser"):
            print(f"  {entry.get('level')} {entry.get('message')}")
    except Exception as e:
        print(f"could not read the browser console: {e}")


def main(argv):
    if len(argv) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    url, token, viewer, image, stuck, screenshot = argv[1:]
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("python3-selenium is not installed for /usr/bin/python3; "
              "run scripts/test, which installs it")
        return 1
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            print(f"{path} is missing: apt package {package}; run scripts/test, which installs it")
            return 1

    try:
        driver = start_browser()
    except Exception:
        traceback.print_exc()
        print("headless Chromium did not start (see above)")
        return 1
    try:
        drive(driver, url, token, viewer, image, stuck)
        ok = True
    except Exception as e:
        print(f"FAILED: {e}")
        if not isinstance(e, Failure):
            traceback.print_exc(file=sys.stdout)
        report(driver)
        ok = False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        driver.save_screenshot(screenshot)
        print(f"screenshot: {screenshot}")
    except Exception as e:
        print(f"could not save the screenshot: {e}")
        ok = False
    finally:
        driver.quit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
