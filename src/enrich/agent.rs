//! Browser, operating system and device type from a user-agent string, with the ua-parser
//! project's patterns (`vendor/uap-core`, compiled once, on first use or by [`warm_up`]).
//! Results are cached per distinct string: an app's users send few distinct agents, and a
//! cached answer costs a hash lookup instead of a pattern search.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;
use serde::Serialize;

/// What a user agent says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// `desktop`, `mobile`, `tablet`, `bot` or `other`.
    pub device_type: &'static str,
    /// The members above as JSON object members (no braces), made once per distinct agent.
    #[serde(skip)]
    pub members: String,
}

const PATTERNS: &str = include_str!("../../vendor/uap-core/regexes.json");
/// Distinct user agents remembered.
const CACHE_ENTRIES: usize = 4096;
/// Longest user agent parsed; longer ones (real agents are a few hundred bytes) are not.
const MAX_AGENT_BYTES: usize = 1024;

struct Parser {
    extractor: ua_parser::Extractor<'static>,
    cache: Mutex<LruCache<Box<str>, Arc<Agent>>>,
}

static PARSER: OnceLock<Option<Parser>> = OnceLock::new();

fn parser() -> Option<&'static Parser> {
    PARSER
        .get_or_init(|| {
            let regexes: ua_parser::Regexes<'static> = match serde_json::from_str(PATTERNS) {
                Ok(regexes) => regexes,
                Err(error) => {
                    tracing::error!(%error, "the user-agent patterns do not load; agents are not parsed");
                    return None;
                }
            };
            match ua_parser::Extractor::try_from(regexes) {
                Ok(extractor) => Some(Parser {
                    extractor,
                    cache: Mutex::new(LruCache::new(
                        NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
                    )),
                }),
                Err(error) => {
                    tracing::error!(%error, "the user-agent patterns do not compile; agents are not parsed");
                    None
                }
            }
        })
        .as_ref()
}

/// Compiles the patterns now (at start, off the request path).
pub fn warm_up() {
    let _ = parser();
}

/// What `user_agent` says, or `None` for an empty or overlong string.
pub fn parse(user_agent: &str) -> Option<Arc<Agent>> {
    let user_agent = user_agent.trim();
    if user_agent.is_empty() || user_agent.len() > MAX_AGENT_BYTES {
        return None;
    }
    let parser = parser()?;
    let lock = || {
        parser
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(hit) = lock().get(user_agent) {
        return Some(Arc::clone(hit));
    }
    let agent = Arc::new(classify(&parser.extractor, user_agent));
    lock().put(user_agent.into(), Arc::clone(&agent));
    Some(agent)
}

fn known(family: &str) -> Option<String> {
    (family != "Other").then(|| family.to_string())
}

fn classify(extractor: &ua_parser::Extractor<'static>, user_agent: &str) -> Agent {
    let (browser, os, device) = extractor.extract(user_agent);
    let browser_family = browser.as_ref().and_then(|b| known(&b.family));
    let os_family = os.as_ref().and_then(|o| known(&o.os));
    let device_family = device.as_ref().map(|d| d.device.to_string());
    let device_type = device_type(
        user_agent,
        browser_family.as_deref(),
        os_family.as_deref(),
        device_family.as_deref(),
    );
    let mut agent = Agent {
        browser_version: browser_family
            .as_ref()
            .and(browser.as_ref().and_then(|b| b.major.map(str::to_string))),
        browser: browser_family,
        os_version: os_family.as_ref().and(
            os.as_ref()
                .and_then(|o| o.major.as_ref().map(|m| m.to_string())),
        ),
        os: os_family,
        device_type,
        members: String::new(),
    };
    agent.members = crate::json::object_members(&agent);
    agent
}

/// The patterns name devices, not their kind: the kind follows from the device, the OS and a
/// few words of the agent itself.
fn device_type(
    user_agent: &str,
    browser: Option<&str>,
    os: Option<&str>,
    device: Option<&str>,
) -> &'static str {
    let lower = user_agent.to_ascii_lowercase();
    let has = |word: &str| lower.contains(word);
    if device == Some("Spider")
        || browser.is_some_and(|b| b.to_ascii_lowercase().contains("bot"))
        || has("bot/")
        || has("crawler")
        || has("spider")
    {
        return "bot";
    }
    let device = device.unwrap_or("");
    if device.contains("iPad")
        || device.contains("Tablet")
        || device.contains("Kindle")
        || has("tablet")
    {
        return "tablet";
    }
    match os {
        Some("Android") if !has("mobile") => "tablet",
        Some(
            "iOS" | "Android" | "Windows Phone" | "BlackBerry OS" | "KaiOS" | "Firefox OS"
            | "Symbian OS" | "HarmonyOS",
        ) => "mobile",
        Some(
            "Windows" | "Mac OS X" | "Linux" | "Ubuntu" | "Chrome OS" | "Fedora" | "Debian"
            | "FreeBSD" | "OpenBSD" | "NetBSD" | "Solaris",
        ) => "desktop",
        _ if has("mobile") => "mobile",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn agent(text: &str) -> Agent {
        (*parse(text).unwrap()).clone()
    }

    #[test]
    fn browsers_systems_and_devices_of_fixed_agents() {
        let chrome = agent("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36");
        assert_eq!(chrome.browser.as_deref(), Some("Chrome"));
        assert_eq!(chrome.browser_version.as_deref(), Some("126"));
        assert_eq!(chrome.os.as_deref(), Some("Linux"));
        assert_eq!(chrome.device_type, "desktop");
        let iphone = agent("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1");
        assert_eq!(iphone.browser.as_deref(), Some("Mobile Safari"));
        assert_eq!(
            (iphone.os.as_deref(), iphone.os_version.as_deref()),
            (Some("iOS"), Some("17"))
        );
        assert_eq!(iphone.device_type, "mobile");
        let ipad = agent("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1");
        assert_eq!(ipad.device_type, "tablet");
        let windows = agent(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",
        );
        assert_eq!(
            (windows.browser.as_deref(), windows.os.as_deref()),
            (Some("Firefox"), Some("Windows"))
        );
        assert_eq!(windows.device_type, "desktop");
        let android = agent("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36");
        assert_eq!(android.os.as_deref(), Some("Android"));
        assert_eq!(android.device_type, "mobile");
        let bot = agent("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)");
        assert_eq!(bot.device_type, "bot");
        let unknown = agent("curl/8.5.0");
        assert_eq!(unknown.os, None);
        assert_eq!(unknown.device_type, "other");
        assert!(parse("").is_none());
        assert!(parse(&"x".repeat(2000)).is_none());
        // A second look comes from the cache, equal.
        assert_eq!(agent("curl/8.5.0"), unknown);
    }
}
