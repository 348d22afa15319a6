//! What a web or app context says about where an event came from: the user agent, the end
//! user's address (`context.ip`, before it is anonymised), the referrer's host and the campaign
//! (UTM parameters of `context.page.url` or `context.page.search`, and Segment's
//! `context.campaign`). Read once per context, borrowing from its text.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

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

fn text(raw: Option<&RawValue>) -> Option<String> {
    let value: String = serde_json::from_str(raw?.get()).ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| value.chars().take(MAX_VALUE_BYTES).collect())
}

fn member(object: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    let value = object.get(key)?.as_str()?.trim();
    (!value.is_empty()).then(|| value.chars().take(MAX_VALUE_BYTES).collect())
}

/// The facts of a context's JSON text (nothing if it is not an object).
pub fn read(context: &str) -> WebFacts {
    let Ok(members) = serde_json::from_str::<Members<'_>>(context) else {
        return WebFacts::default();
    };
    let mut campaign = Campaign::default();
    if let Some(Value::Object(page)) = members
        .page
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
    {
        campaign.referrer_host = member(&page, "referrer").and_then(|referrer| host(&referrer));
        let query = member(&page, "url")
            .and_then(|url| url::Url::parse(&url).ok())
            .and_then(|url| url.query().map(str::to_string))
            .or_else(|| member(&page, "search").map(|s| s.trim_start_matches('?').to_string()));
        if let Some(query) = query {
            for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
                let slot = match &*key {
                    "utm_source" => &mut campaign.utm_source,
                    "utm_medium" => &mut campaign.utm_medium,
                    "utm_campaign" => &mut campaign.utm_campaign,
                    "utm_term" => &mut campaign.utm_term,
                    "utm_content" => &mut campaign.utm_content,
                    _ => continue,
                };
                let value = value.trim();
                if slot.is_none() && !value.is_empty() {
                    *slot = Some(value.chars().take(MAX_VALUE_BYTES).collect());
                }
            }
        }
    }
    // Segment's SDKs put the UTM parameters they saw in `context.campaign` (`name` is the
    // campaign): they fill what the page's address did not.
    if let Some(Value::Object(sent)) = members
        .campaign
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
    {
        let from_context = Campaign {
            referrer_host: None,
            utm_source: member(&sent, "source"),
            utm_medium: member(&sent, "medium"),
            utm_campaign: member(&sent, "name"),
            utm_term: member(&sent, "term"),
            utm_content: member(&sent, "content"),
        };
        campaign = campaign.or(&from_context);
    }
    WebFacts {
        user_agent: text(members.user_agent),
        ip: text(members.ip).and_then(|ip| ip.parse().ok()),
        campaign,
    }
}

/// The host of a URL, lower-case, without a leading `www.`.
fn host(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_ascii_lowercase();
    Some(host.strip_prefix("www.").unwrap_or(&host).to_string())
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
    }
}
