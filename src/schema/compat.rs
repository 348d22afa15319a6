//! Compatibility of two versions of an event's schema.
//!
//! [`changes`] compares the current version with a proposed one, keyword by keyword, and lists
//! every change with the JSON path of the event member it concerns (`$` is the event's
//! `properties`, `$.plan` a member of it, `$.items[*]` an element of an array, `$.*` any member
//! not named in `properties`). Each change says which direction it breaks:
//!
//! - it *narrows* what is valid: an event valid under the old version may be refused by the
//!   new one, so data already sent no longer fits the plan (breaks `backward`);
//! - it *widens* what is valid: an event valid under the new version may be refused by the old
//!   one, so consumers written against the old plan may meet values they do not expect (breaks
//!   `forward`).
//!
//! `full` is both. The rule for members follows tracking plans rather than the strict set
//! inclusion of open content models: members not named in an open schema are taken as not
//! relied on, so adding an optional property breaks nothing, while removing one lets any value
//! through where the old version constrained it (it widens). Keywords the comparison does not
//! model (`$ref`, `anyOf`, `oneOf`, `allOf`, `not`, `if`, `patternProperties`, ...) are
//! compared as whole values: any change to them breaks both directions. docs/decisions/0024
//! records the rule.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a new version must relate to the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compatibility {
    /// Anything goes.
    None,
    /// Every event the current version accepts, the new one accepts too.
    Backward,
    /// Every event the new version accepts, the current one accepts too.
    Forward,
    /// Both.
    Full,
}

impl Compatibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::None => "none",
            Compatibility::Backward => "backward",
            Compatibility::Forward => "forward",
            Compatibility::Full => "full",
        }
    }

    /// Whether a change in this direction is refused under this mode.
    fn refuses(self, change: &Change) -> bool {
        match self {
            Compatibility::None => false,
            Compatibility::Backward => change.breaks_backward,
            Compatibility::Forward => change.breaks_forward,
            Compatibility::Full => change.breaks_backward || change.breaks_forward,
        }
    }
}

/// One difference between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// JSON path of the event member concerned.
    pub path: String,
    /// What changed, e.g. `property_removed`, `type_narrowed`, `required_added`.
    pub change: &'static str,
    pub message: String,
    /// Events valid under the old version may be refused by the new one.
    pub breaks_backward: bool,
    /// Events valid under the new version may be refused by the old one.
    pub breaks_forward: bool,
}

/// The changes from `old` to `new` that `mode` refuses, in path order.
pub fn breaking_changes(old: &Value, new: &Value, mode: Compatibility) -> Vec<Change> {
    changes(old, new)
        .into_iter()
        .filter(|change| mode.refuses(change))
        .collect()
}

/// Every change from `old` to `new`, in the order of the schema's members.
pub fn changes(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    compare(old, new, "$", &mut out);
    out
}

/// Keywords that describe and never constrain.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// Keywords this module compares in detail.
const MODELLED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "format",
    "multipleOf",
];

fn narrowed(path: &str, change: &'static str, message: String) -> Change {
    Change {
        path: path.to_string(),
        change,
        message,
        breaks_backward: true,
        breaks_forward: false,
    }
}

fn widened(path: &str, change: &'static str, message: String) -> Change {
    Change {
        path: path.to_string(),
        change,
        message,
        breaks_backward: false,
        breaks_forward: true,
    }
}

fn both(path: &str, change: &'static str, message: String) -> Change {
    Change {
        path: path.to_string(),
        change,
        message,
        breaks_backward: true,
        breaks_forward: true,
    }
}

/// A schema as an object of keywords; `true` is the empty object, `false` refuses everything.
enum Shape<'a> {
    Keywords(&'a Map<String, Value>),
    Everything,
    Nothing,
}

fn shape(schema: &Value) -> Shape<'_> {
    match schema {
        Value::Object(map) => Shape::Keywords(map),
        Value::Bool(false) => Shape::Nothing,
        _ => Shape::Everything,
    }
}

fn is_unconstrained(schema: &Value) -> bool {
    match shape(schema) {
        Shape::Everything => true,
        Shape::Nothing => false,
        Shape::Keywords(map) => map.keys().all(|k| ANNOTATIONS.contains(&k.as_str())),
    }
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

fn compare(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    let (old_map, new_map) = match (shape(old), shape(new)) {
        (Shape::Nothing, Shape::Nothing) => return,
        (Shape::Nothing, _) => {
            out.push(widened(
                path,
                "schema_opened",
                "was refused entirely (false), now allowed".into(),
            ));
            return;
        }
        (_, Shape::Nothing) => {
            out.push(narrowed(
                path,
                "schema_closed",
                "now refused entirely (false)".into(),
            ));
            return;
        }
        (Shape::Everything, Shape::Everything) => return,
        (Shape::Everything, Shape::Keywords(new)) => (&*EMPTY, new),
        (Shape::Keywords(old), Shape::Everything) => (old, &*EMPTY),
        (Shape::Keywords(old), Shape::Keywords(new)) => (old, new),
    };
    compare_types(old_map, new_map, path, out);
    compare_enums(old_map, new_map, path, out);
    compare_properties(old_map, new_map, path, out);
    if let (Some(old_items), Some(new_items)) = (old_map.get("items"), new_map.get("items")) {
        compare(old_items, new_items, &format!("{path}[*]"), out);
    } else if let Some(items) = new_map.get("items") {
        if !is_unconstrained(items) {
            out.push(narrowed(
                &format!("{path}[*]"),
                "items_constrained",
                "array elements are now constrained".into(),
            ));
        }
    } else if let Some(items) = old_map.get("items") {
        if !is_unconstrained(items) {
            out.push(widened(
                &format!("{path}[*]"),
                "items_unconstrained",
                "array elements are no longer constrained".into(),
            ));
        }
    }
    compare_bounds(old_map, new_map, path, out);
    for keyword in ["pattern", "format", "multipleOf"] {
        let (before, after) = (old_map.get(keyword), new_map.get(keyword));
        match (before, after) {
            (None, None) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, Some(b)) => out.push(narrowed(
                path,
                "constraint_added",
                format!("`{keyword}` {b} added"),
            )),
            (Some(a), None) => out.push(widened(
                path,
                "constraint_removed",
                format!("`{keyword}` {a} removed"),
            )),
            (Some(a), Some(b)) => out.push(both(
                path,
                "constraint_changed",
                format!("`{keyword}` changed from {a} to {b}"),
            )),
        }
    }
    let unmodelled: BTreeSet<&str> = old_map
        .keys()
        .chain(new_map.keys())
        .map(String::as_str)
        .filter(|k| !ANNOTATIONS.contains(k) && !MODELLED.contains(k))
        .collect();
    for keyword in unmodelled {
        if old_map.get(keyword) != new_map.get(keyword) {
            out.push(both(
                path,
                "unanalysed_keyword_changed",
                format!("`{keyword}` changed; the comparison does not analyse it, so it is taken as breaking"),
            ));
        }
    }
}

/// The JSON types a schema allows (`None`: any type). `integer` is implied by `number`.
fn types(map: &Map<String, Value>) -> Option<BTreeSet<String>> {
    let mut set: BTreeSet<String> = match map.get("type")? {
        Value::String(one) => [one.clone()].into(),
        Value::Array(many) => many
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        _ => return None,
    };
    if set.contains("number") {
        set.insert("integer".into());
    }
    Some(set)
}

const ALL_TYPES: [&str; 7] = [
    "array", "boolean", "integer", "null", "number", "object", "string",
];

fn list(types: &BTreeSet<String>) -> String {
    types.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn compare_types(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Change>,
) {
    let all = || {
        ALL_TYPES
            .iter()
            .map(|t| t.to_string())
            .collect::<BTreeSet<_>>()
    };
    let (before, after) = (types(old), types(new));
    if before.is_none() && after.is_none() {
        return;
    }
    let (before, after) = (before.unwrap_or_else(all), after.unwrap_or_else(all));
    let lost: BTreeSet<String> = before.difference(&after).cloned().collect();
    let gained: BTreeSet<String> = after.difference(&before).cloned().collect();
    if !lost.is_empty() {
        out.push(narrowed(
            path,
            "type_narrowed",
            format!(
                "type narrowed from [{}] to [{}]: {} no longer allowed",
                list(&before),
                list(&after),
                list(&lost)
            ),
        ));
    }
    if !gained.is_empty() {
        out.push(widened(
            path,
            "type_widened",
            format!(
                "type widened from [{}] to [{}]: {} now allowed",
                list(&before),
                list(&after),
                list(&gained)
            ),
        ));
    }
}

/// The values an `enum` or `const` allows (`None`: not restricted).
fn allowed_values(map: &Map<String, Value>) -> Option<Vec<&Value>> {
    match (map.get("enum"), map.get("const")) {
        (Some(Value::Array(values)), None) => Some(values.iter().collect()),
        (None, Some(value)) => Some(vec![value]),
        (Some(Value::Array(values)), Some(value)) => {
            Some(values.iter().filter(|v| *v == value).collect())
        }
        _ => None,
    }
}

fn compare_enums(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Change>,
) {
    match (allowed_values(old), allowed_values(new)) {
        (None, None) => {}
        (None, Some(values)) => out.push(narrowed(
            path,
            "enum_added",
            format!("now restricted to {} value(s)", values.len()),
        )),
        (Some(_), None) => out.push(widened(
            path,
            "enum_removed",
            "no longer restricted to a list of values".into(),
        )),
        (Some(before), Some(after)) => {
            let removed: Vec<String> = (before.iter())
                .filter(|v| !after.contains(v))
                .map(|v| v.to_string())
                .collect();
            let added: Vec<String> = (after.iter())
                .filter(|v| !before.contains(v))
                .map(|v| v.to_string())
                .collect();
            if !removed.is_empty() {
                out.push(narrowed(
                    path,
                    "enum_shrunk",
                    format!("values no longer allowed: {}", removed.join(", ")),
                ));
            }
            if !added.is_empty() {
                out.push(widened(
                    path,
                    "enum_grown",
                    format!("values now allowed: {}", added.join(", ")),
                ));
            }
        }
    }
}

/// A member name as a JSON path step.
fn member_path(path: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        format!("{path}.{name}")
    } else {
        format!("{path}[{}]", Value::String(name.to_string()))
    }
}

fn required(map: &Map<String, Value>) -> BTreeSet<&str> {
    match map.get("required") {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    }
}

/// `additionalProperties` of a schema: absent means anything.
fn additional(map: &Map<String, Value>) -> &Value {
    static TRUE: Value = Value::Bool(true);
    map.get("additionalProperties").unwrap_or(&TRUE)
}

fn is_closed(map: &Map<String, Value>) -> bool {
    matches!(shape(additional(map)), Shape::Nothing)
}

fn compare_properties(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Change>,
) {
    let no_properties = Map::new();
    let properties = |map: &Map<String, Value>| match map.get("properties") {
        Some(Value::Object(p)) => p.clone(),
        _ => no_properties.clone(),
    };
    let (before, after) = (properties(old), properties(new));
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let at = member_path(path, name);
        match (before.get(name), after.get(name)) {
            (Some(a), Some(b)) => compare(a, b, &at, out),
            (Some(a), None) => {
                // Now governed by the new version's additionalProperties.
                let closed = is_closed(new);
                if closed || !is_unconstrained(a) {
                    out.push(Change {
                        path: at,
                        change: "property_removed",
                        message: if closed {
                            format!("property {name:?} removed and no longer allowed")
                        } else {
                            format!("property {name:?} removed: any value is now allowed there")
                        },
                        breaks_backward: closed,
                        breaks_forward: !is_unconstrained(a),
                    });
                }
            }
            (None, Some(b)) => {
                if is_closed(old) {
                    out.push(widened(
                        &at,
                        "property_added",
                        format!("property {name:?} added where the old version allowed no other members"),
                    ));
                } else if !is_unconstrained(additional(old)) {
                    // Unnamed members were constrained by the old version's
                    // additionalProperties: the new property is compared with that.
                    compare(additional(old), b, &at, out);
                }
            }
            (None, None) => {}
        }
    }
    let (req_before, req_after) = (required(old), required(new));
    for name in req_after.difference(&req_before) {
        out.push(narrowed(
            &member_path(path, name),
            "required_added",
            format!("property {name:?} is now required"),
        ));
    }
    for name in req_before.difference(&req_after) {
        out.push(widened(
            &member_path(path, name),
            "required_removed",
            format!("property {name:?} is no longer required"),
        ));
    }
    let (extra_before, extra_after) = (additional(old), additional(new));
    if extra_before != extra_after {
        compare(extra_before, extra_after, &format!("{path}.*"), out);
    }
}

/// Numeric bounds: (keyword, whether a larger value narrows).
const BOUNDS: &[(&str, bool)] = &[
    ("minimum", true),
    ("exclusiveMinimum", true),
    ("maximum", false),
    ("exclusiveMaximum", false),
    ("minLength", true),
    ("maxLength", false),
    ("minItems", true),
    ("maxItems", false),
    ("minProperties", true),
    ("maxProperties", false),
];

fn compare_bounds(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Change>,
) {
    for (keyword, larger_narrows) in BOUNDS {
        let before = old.get(*keyword).and_then(Value::as_f64);
        let after = new.get(*keyword).and_then(Value::as_f64);
        let narrows = match (before, after) {
            (None, None) => continue,
            (Some(a), Some(b)) if a == b => continue,
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => (b > a) == *larger_narrows,
        };
        let shown = |v: Option<f64>| v.map_or("none".to_string(), |v| v.to_string());
        let message = format!(
            "`{keyword}` changed from {} to {}",
            shown(before),
            shown(after)
        );
        out.push(if narrows {
            narrowed(path, "bound_tightened", message)
        } else {
            widened(path, "bound_relaxed", message)
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn kinds(old: Value, new: Value, mode: Compatibility) -> Vec<(String, &'static str)> {
        breaking_changes(&old, &new, mode)
            .into_iter()
            .map(|c| (c.path, c.change))
            .collect()
    }

    fn plan() -> Value {
        json!({
            "type": "object",
            "properties": {
                "plan": {"type": "string", "enum": ["free", "pro", "team"]},
                "seats": {"type": ["integer", "string"], "minimum": 1},
                "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}
            },
            "required": ["plan"]
        })
    }

    #[test]
    fn identical_versions_and_annotations_change_nothing() {
        let mut described = plan();
        described["description"] = json!("checkout");
        described["properties"]["plan"]["title"] = json!("Plan");
        assert!(changes(&plan(), &described).is_empty());
    }

    #[test]
    fn each_narrowing_breaks_backward_with_its_path() {
        let mut new = plan();
        new["properties"]["plan"]["enum"] = json!(["pro", "team"]);
        new["properties"]["seats"]["type"] = json!("integer");
        new["properties"]["items"]["items"]["properties"]["sku"]["maxLength"] = json!(12);
        new["required"] = json!(["plan", "seats"]);
        let found = kinds(plan(), new.clone(), Compatibility::Backward);
        assert_eq!(
            found,
            vec![
                ("$.items[*].sku".to_string(), "bound_tightened"),
                ("$.plan".to_string(), "enum_shrunk"),
                ("$.seats".to_string(), "type_narrowed"),
                ("$.seats".to_string(), "required_added"),
            ]
        );
        // None of these widens.
        assert!(kinds(plan(), new.clone(), Compatibility::Forward).is_empty());
        assert_eq!(kinds(plan(), new.clone(), Compatibility::Full).len(), 4);
        assert!(kinds(plan(), new, Compatibility::None).is_empty());
    }

    #[test]
    fn each_widening_breaks_forward() {
        let mut new = plan();
        new["properties"].as_object_mut().unwrap().remove("seats");
        new["properties"]["plan"]["enum"] = json!(["free", "pro", "team", "enterprise"]);
        new["required"] = json!([]);
        let found = kinds(plan(), new.clone(), Compatibility::Forward);
        assert_eq!(
            found,
            vec![
                ("$.plan".to_string(), "enum_grown"),
                ("$.seats".to_string(), "property_removed"),
                ("$.plan".to_string(), "required_removed"),
            ]
        );
        assert!(kinds(plan(), new, Compatibility::Backward).is_empty());
    }

    #[test]
    fn adding_an_optional_property_is_compatible_unless_the_old_model_was_closed() {
        let mut new = plan();
        new["properties"]["coupon"] = json!({"type": "string"});
        assert!(kinds(plan(), new.clone(), Compatibility::Full).is_empty());
        let mut closed = plan();
        closed["additionalProperties"] = json!(false);
        let mut new_closed = new.clone();
        new_closed["additionalProperties"] = json!(false);
        assert_eq!(
            kinds(closed, new_closed, Compatibility::Full),
            vec![("$.coupon".to_string(), "property_added")]
        );
        // Closing an open model narrows.
        let mut closing = plan();
        closing["additionalProperties"] = json!(false);
        assert_eq!(
            kinds(plan(), closing, Compatibility::Backward),
            vec![("$.*".to_string(), "schema_closed")]
        );
    }

    #[test]
    fn integer_to_number_widens_and_back_narrows() {
        let int = json!({"properties": {"n": {"type": "integer"}}});
        let num = json!({"properties": {"n": {"type": "number"}}});
        assert!(kinds(int.clone(), num.clone(), Compatibility::Backward).is_empty());
        assert_eq!(
            kinds(int.clone(), num.clone(), Compatibility::Forward),
            vec![("$.n".to_string(), "type_widened")]
        );
        assert_eq!(
            kinds(num, int, Compatibility::Backward),
            vec![("$.n".to_string(), "type_narrowed")]
        );
    }

    #[test]
    fn unanalysed_keywords_break_both_ways_when_changed() {
        let old = json!({"properties": {"v": {"anyOf": [{"type": "string"}, {"type": "null"}]}}});
        let new = json!({"properties": {"v": {"anyOf": [{"type": "string"}]}}});
        let found = breaking_changes(&old, &new, Compatibility::Forward);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].change, "unanalysed_keyword_changed");
        assert!(found[0].message.contains("anyOf"));
        assert_eq!(breaking_changes(&old, &old, Compatibility::Full), vec![]);
    }

    #[test]
    fn odd_member_names_are_quoted_in_paths() {
        let old = json!({"properties": {"a b": {"type": "string"}}});
        let new = json!({"properties": {"a b": {"type": "number"}}});
        let found = changes(&old, &new);
        assert!(found.iter().all(|c| c.path == "$[\"a b\"]"), "{found:?}");
    }
}
