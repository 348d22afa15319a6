//! What a web or app context says about where an event came from: the user agent, the end
//! user's address (`context.ip`, before it is anonymised), the referrer's host and the campaign
//! (UTM parameters of `context.page.url` or `context.page.search`, and Segment's
//! `context.campaign`). Read once per context, borrowing from its text.

use std::borrow::Cow;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The members of a context read here, unparsed.
#[derive(Deserialize, Default)]
struct Members<'a> {
    #[serde(borrow, default, rename = "userAgent")]
    user_agent: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ip: Option<&'a RawValue>,
    #[serde(borrow, default)]
    page: Option<&'a RawValue>,
    #[serde(borrow, default)]
    campaign: Option<&'a RawValue>,
}

/// What one context says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebFacts {
    pub user_agent: Option<String>,
    pub ip: Option<IpAddr>,
    pub campaign: Campaign,
}

/// Where a visit came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Campaign {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_medium: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_content: Option<String>,
}

impl Campaign {
    pub fn is_empty(&self) -> bool {
        *self == Campaign::default()
    }

    /// Each member of `self`, else of `base`.
    pub fn or(self, base: &Campaign) -> Campaign {
        let pick = |own: Option<String>, base: &Option<String>| own.or_else(|| base.clone());
        Campaign {
            referrer_host: pick(self.referrer_host, &base.referrer_host),
            utm_source: pick(self.utm_source, &base.utm_source),
            utm_medium: pick(self.utm_medium, &base.utm_medium),
            utm_campaign: pick(self.utm_campaign, &base.utm_campaign),
            utm_term: pick(self.utm_term, &base.utm_term),
            utm_content: pick(self.utm_content, &base.utm_content),
        }
    }
}

/// Longest value kept from a UTM parameter or a campaign member.
const MAX_VALUE_BYTES: usize = 256;

/// A JSON string's value, borrowed when it has no escapes.
fn string(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let raw = raw?.get();
    match serde_json::from_str::<&str>(raw) {
        Ok(text) => Some(Cow::Borrowed(text)),
        Err(_) => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
    }
}

/// A kept value: trimmed, not empty, at most [`MAX_VALUE_BYTES`] characters.
fn kept(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.chars().take(MAX_VALUE_BYTES).collect())
}

/// `context.page`'s members read here.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow, default)]
    referrer: Option<&'a RawValue>,
    #[serde(borrow, default)]
    url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    search: Option<&'a RawValue>,
}

/// Segment's `context.campaign`.
#[derive(Deserialize)]
struct SentCampaign<'a> {
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(borrow, default)]
    medium: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    term: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// The facts of a context's JSON text (nothing if it is not an object).
pub fn read(context: &str) -> WebFacts {
    let Ok(members) = serde_json::from_str::<Members<'_>>(context) else {
        return WebFacts::default();
    };
    let mut campaign = Campaign::default();
    if let Some(page) = members
        .page
        .and_then(|raw| serde_json::from_str::<Page<'_>>(raw.get()).ok())
    {
        campaign.referrer_host = string(page.referrer).and_then(|referrer| host(&referrer));
        // Most addresses carry no campaign: only those that mention one are parsed.
        let query = [page.url, page.search]
            .into_iter()
            .filter_map(string)
            .find(|text| text.contains("utm_"));
        if let Some(query) = query {
            let query = query.split_once('?').map_or(&*query, |(_, q)| q);
            let query = query.split('#').next().unwrap_or("");
            for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
                let slot = match &*key {
                    "utm_source" => &mut campaign.utm_source,
                    "utm_medium" => &mut campaign.utm_medium,
                    "utm_campaign" => &mut campaign.utm_campaign,
                    "utm_term" => &mut campaign.utm_term,
                    "utm_content" => &mut campaign.utm_content,
                    _ => continue,
                };
                if slot.is_none() {
                    *slot = kept(&value);
                }
            }
        }
    }
    // Segment's SDKs put the UTM parameters they saw in `context.campaign` (`name` is the
    // campaign): they fill what the page's address did not.
    if let Some(sent) = members
        .campaign
        .and_then(|raw| serde_json::from_str::<SentCampaign<'_>>(raw.get()).ok())
    {
        let member = |raw| string(raw).and_then(|v| kept(&v));
        let from_context = Campaign {
            referrer_host: None,
            utm_source: member(sent.source),
            utm_medium: member(sent.medium),
            utm_campaign: member(sent.name),
            utm_term: member(sent.term),
            utm_content: member(sent.content),
        };
        campaign = campaign.or(&from_context);
    }
    WebFacts {
        user_agent: string(members.user_agent).and_then(|ua| kept(&ua)),
        ip: string(members.ip).and_then(|ip| ip.trim().parse().ok()),
        campaign,
    }
}

/// The host of an absolute URL, lower-case, without a leading `www.`.
fn host(url: &str) -> Option<String> {
    let (_, rest) = url.trim().split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port.split_inclusive(']').next()?
    } else {
        host_port.split(':').next()?
    };
    let host = host.to_ascii_lowercase();
    let host = host.strip_prefix("www.").unwrap_or(&host);
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    valid.then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn referrer_utm_and_campaign_from_fixed_contexts() {
        let facts = read(
            r#"{"library":{"name":"analytics.js"},"userAgent":"curl/8","ip":"203.0.113.9",
               "page":{"url":"https://shop.example/p?utm_source=news&utm_medium=email&utm_campaign=spring%20sale&x=1",
                       "referrer":"https://WWW.Example.org/a?b"},
               "campaign":{"name":"ignored","source":"ignored","term":"shoes"}}"#,
        );
        assert_eq!(facts.user_agent.as_deref(), Some("curl/8"));
        assert_eq!(facts.ip, Some("203.0.113.9".parse().unwrap()));
        let c = facts.campaign;
        assert_eq!(c.referrer_host.as_deref(), Some("example.org"));
        assert_eq!(c.utm_source.as_deref(), Some("news"));
        assert_eq!(c.utm_medium.as_deref(), Some("email"));
        assert_eq!(c.utm_campaign.as_deref(), Some("spring sale"));
        assert_eq!(c.utm_term.as_deref(), Some("shoes"));
        assert_eq!(c.utm_content, None);
        // `search` when there is no url; wrong types and bad values are skipped.
        let facts = read(
            r#"{"page":{"search":"?utm_source=ads","referrer":"not a url"},"userAgent":5,"ip":"x"}"#,
        );
        assert_eq!(facts.campaign.utm_source.as_deref(), Some("ads"));
        assert_eq!(facts.campaign.referrer_host, None);
        assert_eq!((facts.user_agent, facts.ip), (None, None));
        assert_eq!(read("[]"), WebFacts::default());
        assert_eq!(
            host("https://user@Sub.Example.com:8443/x"),
            Some("sub.example.com".into())
        );
        assert_eq!(host("http://[2001:db8::1]/"), Some("[2001:db8::1]".into()));
        assert_eq!(host("/relative"), None);
    }
}
