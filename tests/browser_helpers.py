"""Bounded waits for the selenium tests that hold up while the page re-renders itself.

A page that redraws on a timer (the dashboard replaces its table rows and topic tree on every
refresh) may replace an element between the moment a test finds it and the moment the test reads
or clicks it; selenium then raises StaleElementReferenceException. So an element is found inside
the wait that uses it, and an element that is missing or was replaced means "not yet": the wait
finds it again on its next poll.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 20.0
T = TypeVar("T")


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], message: str, timeout: float = WAIT) -> T:
    """The first truthy value of condition(driver), polled every 0.1 s for at most timeout seconds.
    A missing or stale element inside the condition counts as "not yet"."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return wait.until(condition, message)


def text_of(driver: WebDriver, selector: str, message: str) -> str:
    """The text of the element the CSS selector finds, once it is there and shows some text."""
    return wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector).text, message)


def click(driver: WebDriver, selector: str, message: str) -> None:
    """Clicks the element the CSS selector finds, finding it again if the page replaced it meanwhile
    (a stale element is refused before any click reaches the page, so nothing is clicked twice)."""
    def found_and_clicked(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True
    wait_for(driver, found_and_clicked, message)
