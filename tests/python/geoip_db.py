"""Writes a small MaxMind-format city database (GeoIP2-City layout) for the GeoIP tests.

Usage: geoip_db.py <out.mmdb>. The places are fixed: the tests expect exactly these.
"""
import sys

from mmdb_writer import MMDBWriter
from netaddr import IPSet

writer = MMDBWriter(
    ip_version=6,
    ipv4_compatible=True,
    database_type="GeoIP2-City",
    languages=["en"],
    description="StatsRemote test places",
)
writer.insert_network(
    IPSet(["203.0.113.0/24"]),
    {
        "country": {"iso_code": "DE", "names": {"en": "Germany"}},
        "subdivisions": [{"iso_code": "BE", "names": {"en": "Berlin"}}],
        "city": {"names": {"en": "Berlin"}},
    },
)
writer.insert_network(
    IPSet(["198.51.100.0/24"]),
    {"country": {"iso_code": "FR", "names": {"en": "France"}}, "city": {"names": {"en": "Paris"}}},
)
writer.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "JP"}})
writer.to_db_file(sys.argv[1])
