"""Genesys Cloud regions and the URLs derived from them, as the official SDK derives them."""

from __future__ import annotations

import re
from collections.abc import Mapping

# The Genesys Cloud regions, by the names of the Python SDK's PureCloudRegionHosts enum
# (219.0.0, plus mx_central_1, ap_southeast_1 and eusc_de_east_1 of later releases).
GENESYS_REGION_NAMES: Mapping[str, str] = {
    "us_east_1": "mypurecloud.com",
    "eu_west_1": "mypurecloud.ie",
    "ap_southeast_2": "mypurecloud.com.au",
    "ap_northeast_1": "mypurecloud.jp",
    "eu_central_1": "mypurecloud.de",
    "us_west_2": "usw2.pure.cloud",
    "ca_central_1": "cac1.pure.cloud",
    "ap_northeast_2": "apne2.pure.cloud",
    "eu_west_2": "euw2.pure.cloud",
    "ap_south_1": "aps1.pure.cloud",
    "us_east_2": "use2.us-gov-pure.cloud",
    "sa_east_1": "sae1.pure.cloud",
    "me_central_1": "mec1.pure.cloud",
    "ap_northeast_3": "apne3.pure.cloud",
    "eu_central_2": "euc2.pure.cloud",
    "mx_central_1": "mxc1.pure.cloud",
    "ap_southeast_1": "apse1.pure.cloud",
    "eusc_de_east_1": "edee1.eusc-pure.cloud",
}
GENESYS_REGIONS = frozenset(GENESYS_REGION_NAMES.values())


def genesys_region(raw: str) -> str | None:
    """Return the region's domain for a domain or an SDK region name (`eu_west_1`,
    `eu-west-1`), or None when it is not a Genesys Cloud region."""
    name = raw.strip().lower()
    if name in GENESYS_REGIONS:
        return name
    return GENESYS_REGION_NAMES.get(name.replace("-", "_"))


def genesys_login_url(api_url: str) -> str | None:
    """Derive the login URL from an API URL as the SDK does (`//api.` -> `//login.`);
    None when the URL has no `api.` host to replace (a gateway)."""
    login, replaced = re.subn(r"//api\.", "//login.", api_url, count=1)
    return login if replaced else None


def genesys_urls(region: str, api_url: str = "", login_url: str = "") -> tuple[str, str]:
    """The API and login base URLs of a region's domain: explicit URLs win (gateways,
    tests), and the login host follows an explicit API host (`api.` -> `login.`)."""
    api = (api_url or f"https://api.{region}").rstrip("/")
    login = login_url or genesys_login_url(api) or f"https://login.{region}"
    return api, login.rstrip("/")
