//! The configuration reference (docs/CONFIG.md), generated from the
//! daemons' own config types: each derives `schemars::JsonSchema` next to
//! its serde derives, so a key, its default and its doc comment reach the
//! page from the one place the daemon reads them from. A test fails when
//! the committed page differs from what the types generate.
//!
//! Units: a key ending in `_ms` is in milliseconds; other units are given
//! on the field with `#[schemars(extend("x-unit" = "..."))]`.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;
use std::fmt::Write as _;

/// One daemon's configuration file.
pub struct Daemon {
    /// The binary.
    pub name: &'static str,
    /// Where its packaged unit (or the examples) put the file.
    pub file: &'static str,
    /// What the file is, in a sentence.
    pub about: &'static str,
    /// Its JSON schema (every subschema inlined).
    pub schema: Value,
}

fn schema_of<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .for_deserialize()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    generator.into_root_schema_for::<T>().to_value()
}

/// `schema` without the top-level key `key`.
fn without(mut schema: Value, key: &str) -> Value {
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.remove(key);
    }
    schema
}

/// Every daemon that reads a configuration file, in the order of the page.
pub fn daemons() -> Vec<Daemon> {
    vec![
        Daemon {
            name: "pon-cu",
            file: "/etc/pon/cu.toml",
            about: "The Central Unit (`pon-cu run --config FILE`).",
            schema: schema_of::<pon_cu::config::CuConfig>(),
        },
        Daemon {
            name: "pon-proxy",
            file: "/etc/pon/proxy.toml",
            about: "A proxy: forwarder, monitor and router in one process. The \
                    top-level keys are pon-forwarder's, but `[local]`: the proxy \
                    refuses it, its parts talk in process.",
            schema: without(schema_of::<pon_proxy::ProxyConfig>(), "local"),
        },
        Daemon {
            name: "pon-forwarder",
            file: "/etc/pon/forwarder.toml",
            about: "The forwarder of a split proxy (with `[local]`), or a \
                    proxy without monitor and router.",
            schema: schema_of::<pon_proxy::forwarder::ForwarderConfig>(),
        },
        Daemon {
            name: "pon-monitor",
            file: "/etc/pon/monitor.toml",
            about: "The monitor of a split proxy.",
            schema: schema_of::<pon_proxy::config::MonitorDaemonConfig>(),
        },
        Daemon {
            name: "pon-router",
            file: "/etc/pon/router.toml",
            about: "The router of a split proxy.",
            schema: schema_of::<pon_proxy::config::RouterDaemonConfig>(),
        },
        Daemon {
            name: "pon-agent",
            file: "/etc/pon/agent.toml",
            about: "An app VM's agent: the TA in `[ta]`, the RA in `[ra]`.",
            schema: schema_of::<pon_agents::config::AgentConfig>(),
        },
        Daemon {
            name: "pon-ta",
            file: "/etc/pon/ta.toml",
            about: "The transmission agent alone (pon-agent's `[ta]`).",
            schema: schema_of::<pon_agents::config::TaConfig>(),
        },
        Daemon {
            name: "pon-ra",
            file: "/etc/pon/ra.toml",
            about: "The reception agent alone (pon-agent's `[ra]`).",
            schema: schema_of::<pon_agents::config::RaConfig>(),
        },
    ]
}

/// One key of a file, as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Where it is written: `key`, `[table] key`, `[[array]] key`.
    pub key: String,
    pub ty: String,
    /// The default, as TOML; "required" or "unset" when there is none.
    pub default: String,
    pub unit: String,
    pub meaning: String,
}

/// Every key of a schema, tables flattened into their keys.
pub fn rows(schema: &Value) -> Vec<Row> {
    let mut out = Vec::new();
    walk(schema, &Place::Top, &mut out);
    out
}

/// The table a key lives in.
enum Place {
    Top,
    Table(String),
    Array(String),
}

impl Place {
    fn key(&self, key: &str) -> String {
        match self {
            Place::Top => key.to_string(),
            Place::Table(t) => format!("[{t}] {key}"),
            Place::Array(t) => format!("[[{t}]] {key}"),
        }
    }
    fn path(&self, key: &str) -> String {
        match self {
            Place::Top => key.to_string(),
            Place::Table(t) | Place::Array(t) => format!("{t}.{key}"),
        }
    }
}

fn walk(schema: &Value, place: &Place, out: &mut Vec<Row>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (key, prop) in props {
        let inner = without_null(prop);
        // A table of keys (a section) or an array of them: its keys are rows.
        if is_table(&inner) {
            walk(&inner, &Place::Table(place.path(key)), out);
            continue;
        }
        if let Some(items) = inner.get("items").filter(|i| is_table(i)) {
            walk(items, &Place::Array(place.path(key)), out);
            continue;
        }
        // A map of named tables (`[clouds.NAME]`).
        if let Some(values) = inner.get("additionalProperties").filter(|v| is_table(v)) {
            walk(
                values,
                &Place::Table(format!("{}.NAME", place.path(key))),
                out,
            );
            continue;
        }
        let default = match prop.get("default") {
            Some(Value::Null) | None if required.contains(&key.as_str()) => "required".into(),
            Some(Value::Null) | None => "unset".into(),
            Some(v) => format!("`{}`", toml_value(v)),
        };
        let unit = match prop.get("x-unit").and_then(Value::as_str) {
            Some(u) => u.to_string(),
            None if key.ends_with("_ms") => "ms".into(),
            None => String::new(),
        };
        out.push(Row {
            key: place.key(key),
            ty: type_name(&inner),
            default,
            unit,
            meaning: description(prop) + &variants(&inner),
        });
    }
}

/// `Option<T>`'s schema without its `null`.
fn without_null(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Some(Value::Array(types)) = s.get("type") {
        let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        s["type"] = if kept.len() == 1 {
            kept[0].clone()
        } else {
            Value::Array(kept)
        };
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = s.get(k) {
            let kept: Vec<Value> = alts
                .iter()
                .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                .cloned()
                .collect();
            if kept.len() == 1 {
                let mut one = kept[0].clone();
                if let (Some(o), Some(d)) = (one.as_object_mut(), s.get("description")) {
                    o.entry("description").or_insert(d.clone());
                }
                return one;
            }
            s[k] = Value::Array(kept);
        }
    }
    s
}

fn is_table(schema: &Value) -> bool {
    schema.get("properties").is_some()
}

fn description(schema: &Value) -> String {
    schema
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// What each choice of an enum means, where its variants say.
fn variants(schema: &Value) -> String {
    // A titled type (an IP network, say) is one thing, not a choice.
    let Some(alts) = schema
        .get("oneOf")
        .and_then(Value::as_array)
        .filter(|_| schema.get("title").is_none())
    else {
        return String::new();
    };
    let said: Vec<String> = alts
        .iter()
        .filter_map(|a| {
            let what = description(a);
            (!what.is_empty()).then(|| format!("{}: {what}", type_name(a)))
        })
        .collect();
    if said.is_empty() {
        String::new()
    } else {
        format!(" {}", said.join(" "))
    }
}

fn type_name(schema: &Value) -> String {
    if let Some(title) = schema.get("title").and_then(Value::as_str) {
        return title.to_string();
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return one_of(values.iter().map(|v| format!("`{}`", toml_value(v))));
    }
    if let Some(c) = schema.get("const") {
        return format!("`{}`", toml_value(c));
    }
    for k in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(k).and_then(Value::as_array) {
            return one_of(alts.iter().map(type_name));
        }
    }
    let format = schema.get("format").and_then(Value::as_str);
    match (schema.get("type").and_then(Value::as_str), format) {
        (Some("string"), Some("ipv4")) => "IPv4 address".into(),
        (Some("string"), Some("public-key")) => "public key (base64)".into(),
        (Some("string"), Some("host-port")) => "host:port".into(),
        // Marked on the fields: std's SocketAddr and PathBuf are bare strings.
        (Some("string"), Some(f @ ("address:port" | "path"))) => f.into(),
        (Some("string"), _) => "string".into(),
        (Some("boolean"), _) => "bool".into(),
        (Some("integer"), Some(f)) => integer(f),
        (Some("integer"), None) => "integer".into(),
        (Some("number"), _) => "float".into(),
        (Some("array"), _) => match schema.get("items") {
            Some(items) => format!("list of {}", type_name(items)),
            None => "list".into(),
        },
        _ if schema.get("properties").is_some() => inline_table(schema),
        (Some("object"), _) => match schema.get("additionalProperties") {
            Some(v) if v.is_object() => format!("table of {}", type_name(v)),
            _ => "table".into(),
        },
        _ => "any".into(),
    }
}

/// A table written inline, as an enum variant with data is:
/// `{ weighted = { rtt, loss, bandwidth } }`.
fn inline_table(schema: &Value) -> String {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return type_name(schema);
    };
    let keys: Vec<String> = props
        .iter()
        .map(
            |(k, v)| match v.get("properties").and_then(Value::as_object) {
                Some(inner) => {
                    let names: Vec<&str> = inner.keys().map(String::as_str).collect();
                    format!("{k} = {{ {} }}", names.join(", "))
                }
                None => format!("{k} = {}", type_name(v)),
            },
        )
        .collect();
    format!("`{{ {} }}`", keys.join(", "))
}

/// `uint16` → `integer (0–65535)`.
fn integer(format: &str) -> String {
    let range = match format {
        "uint8" => "0–255",
        "uint16" => "0–65535",
        "uint32" => "0–2³²−1",
        "uint64" | "uint" => "0–2⁶⁴−1",
        other => other,
    };
    format!("integer ({range})")
}

fn one_of(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("one of {}", items.join(", "))
    }
}

/// A default as it is written in the TOML file.
fn toml_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{ {} }}",
            o.iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// The whole page.
pub fn render() -> String {
    let mut page = String::from(
        "# PON configuration reference\n\n\
         <!-- Generated from the daemons' config types by `cargo run --release -p \
         pon-config-reference > docs/CONFIG.md`; do not edit by hand. -->\n\n\
         Every key of every daemon's TOML file: its type, its default (\"required\": \
         the file must set it; \"unset\": off, or chosen at run time as the \
         meaning says), its unit and its meaning. Keys in `[table]` are written \
         under that table, keys in `[[array]]` once per entry; unknown keys are \
         refused. `DAEMON --config FILE --check` checks a file (`pon-cu run \
         --config FILE --check` for the CU). Relative paths are relative to the \
         file's directory. Examples: `packaging/*.toml` (installed in `/etc/pon/` \
         by the packages) and `packaging/examples/`.\n",
    );
    let daemons = daemons();
    page.push_str("\n| daemon | file |\n|---|---|\n");
    for d in &daemons {
        let _ = writeln!(page, "| [{0}](#{0}) | `{1}` |", d.name, d.file);
    }
    for d in &daemons {
        let _ = write!(
            page,
            "\n## {}\n\n{} Usually `{}`.\n\n| key | type | default | unit | meaning |\n|---|---|---|---|---|\n",
            d.name, d.about, d.file
        );
        for r in rows(&d.schema) {
            let _ = writeln!(
                page,
                "| `{}` | {} | {} | {} | {} |",
                r.key, r.ty, r.default, r.unit, r.meaning
            );
        }
    }
    page
}
