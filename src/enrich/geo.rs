//! Country, region and city of an IP address, from a MaxMind-format database file
//! (`enrich.geoip_database`: GeoLite2-City, GeoIP2-City, DB-IP's city lite, or one of your own).
//! Looked up before the address is anonymised; only the place is kept.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// An open database.
pub struct GeoDatabase {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// Where an address is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Place {
    /// ISO 3166-1 alpha-2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The first subdivision's ISO 3166-2 code (without the country), else its English name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// English name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
}

impl Place {
    pub fn is_empty(&self) -> bool {
        self.country.is_none() && self.region.is_none() && self.city.is_none()
    }
}

/// The parts of a city record read here (GeoIP2 City layout).
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Named<'a>>,
    #[serde(borrow, default)]
    subdivisions: Option<Vec<Named<'a>>>,
    #[serde(borrow, default)]
    city: Option<Named<'a>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

impl Named<'_> {
    fn english(&self) -> Option<String> {
        self.names
            .as_ref()
            .and_then(|names| names.get("en"))
            .map(|name| name.to_string())
    }
}

impl GeoDatabase {
    /// Opens the database, or says why not.
    pub fn open(path: &Path) -> Result<GeoDatabase, String> {
        maxminddb::Reader::open_readfile(path)
            .map(|reader| GeoDatabase { reader })
            .map_err(|error| format!("cannot open {}: {error}", path.display()))
    }

    /// Where `ip` is, as far as the database knows.
    pub fn place(&self, ip: IpAddr) -> Place {
        let record = match self
            .reader
            .lookup(ip)
            .and_then(|found| found.decode::<Record<'_>>())
        {
            Ok(Some(record)) => record,
            _ => return Place::default(),
        };
        Place {
            country: record
                .country
                .as_ref()
                .and_then(|c| c.iso_code.map(str::to_string)),
            region: record
                .subdivisions
                .as_ref()
                .and_then(|s| s.first())
                .and_then(|s| s.iso_code.map(str::to_string).or_else(|| s.english())),
            city: record.city.as_ref().and_then(Named::english),
        }
    }
}
