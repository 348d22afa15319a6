"""Sends a known set of events to StatsRemote through an official Python SDK, as an app would.

Usage: send.py <sdk> <host> <key> <run> [v1]
  sdk: segment (segment-analytics-python) or posthog (posthog)
  run: a prefix that makes this run's ids unique
  v1:  posthog only: the v1 capture protocol instead of the legacy one

Every call type of the SDK is sent once, the first event again with the same id (a retry the
server must count once), then the SDK is flushed and shut down. Prints the ids it used.
"""

import datetime
import json
import sys

sdk, host, key, run = sys.argv[1:5]
v1 = len(sys.argv) > 5 and sys.argv[5] == "v1"
at = datetime.datetime(2026, 3, 1, 10, 0, 0, tzinfo=datetime.timezone.utc)
ids = {}

if sdk == "segment":
    from segment.analytics import Client

    client = Client(write_key=key, host=host, gzip=True, max_retries=5, upload_interval=0.1)
    user = f"{run}-user"
    for call in ["track", "identify", "page", "screen", "group", "alias"]:
        ids[call] = f"{run}-{call}"
    client.track(user_id=user, event="Signed Up", properties={"plan": "pro"},
                 timestamp=at, message_id=ids["track"])
    client.identify(user_id=user, traits={"email": "ann@example.com"},
                    timestamp=at, message_id=ids["identify"])
    client.page(user_id=user, name="Home", properties={"path": "/"},
                timestamp=at, message_id=ids["page"])
    client.screen(user_id=user, name="Main", timestamp=at, message_id=ids["screen"])
    client.group(user_id=user, group_id=f"{run}-team", traits={"size": 3},
                 timestamp=at, message_id=ids["group"])
    client.alias(previous_id=f"{run}-anon", user_id=user, timestamp=at, message_id=ids["alias"])
    client.track(user_id=user, event="Signed Up", properties={"plan": "pro"},
                 timestamp=at, message_id=ids["track"])
    client.flush()
    client.shutdown()
elif sdk == "posthog":
    from posthog import Posthog

    mode = "v1" if v1 else None
    client = Posthog(key, host=host, gzip=True, max_retries=5, flush_interval=0.1,
                     capture_mode=mode)
    user = f"{run}-user"
    base = "0190a0e0-0000-7000-8000-"
    for n, call in enumerate(["capture", "set", "alias", "group_identify"]):
        ids[call] = f"{base}{abs(hash(run)) % 10**6:06d}{n:06d}"
    client.capture("signed_up", distinct_id=user, properties={"plan": "pro"},
                   timestamp=at, uuid=ids["capture"])
    client.set(distinct_id=user, properties={"email": "ann@example.com"},
               timestamp=at, uuid=ids["set"])
    client.alias(previous_id=f"{run}-anon", distinct_id=user, timestamp=at, uuid=ids["alias"])
    client.group_identify("company", f"{run}-team", {"size": 3}, timestamp=at,
                          uuid=ids["group_identify"], distinct_id=user)
    client.capture("signed_up", distinct_id=user, properties={"plan": "pro"},
                   timestamp=at, uuid=ids["capture"])
    client.flush()
    client.shutdown()
else:
    sys.exit(f"unknown sdk {sdk!r}")

print(json.dumps(ids))
