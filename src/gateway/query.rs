//! Query strings into typed structs. `serde_urlencoded` decodes (`%XX`, `+`) and fills
//! the struct; a parameter the struct does not declare, or one given twice, is a 422
//! `invalid_field` naming it: a misspelt `ofset=` is never silently ignored.
//!
//! The parameter names come from the struct itself (the field list serde's derive hands
//! to `deserialize_struct`), so the accepted set cannot drift from the type.

use super::ApiError;
use serde::de::{self, DeserializeOwned, Visitor};
use std::collections::HashSet;

/// No query parameters at all.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Parse `query` (the part after `?`, if any) into `T`.
pub fn parse<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let query = query.unwrap_or("");
    let known = field_names::<T>();
    let mut seen = HashSet::new();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(unreadable)?;
    for (key, _) in &pairs {
        if !known.contains(&key.as_str()) {
            let accepted = if known.is_empty() {
                "this path takes no query parameters".to_string()
            } else {
                format!("this path accepts {}", known.join(", "))
            };
            let name = shorten(key);
            return Err(ApiError::invalid_field(
                &name,
                format!("unknown query parameter `{name}`: {accepted}"),
            ));
        }
        if !seen.insert(key.as_str()) {
            let name = shorten(key);
            return Err(ApiError::invalid_field(
                &name,
                format!("`{name}` is given more than once"),
            ));
        }
    }
    serde_urlencoded::from_str(query).map_err(unreadable)
}

fn unreadable(e: serde_urlencoded::de::Error) -> ApiError {
    ApiError::new(
        crate::error::Code::BadRequest,
        format!("cannot read the query string: {e}"),
    )
}

/// At most 64 characters of a name the client sent, for messages and `field`.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The field names serde's derive declares for `T` (empty for anything but a struct).
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl std::fmt::Display for Found {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("found the field names")
        }
    }
    impl std::error::Error for Found {}
    impl de::Error for Found {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Found(&[])
        }
    }
    /// Answers only `deserialize_struct`, by failing with the field list it was given.
    struct Probe;
    impl<'de> de::Deserializer<'de> for Probe {
        type Error = Found;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Found(fields)) => fields,
        Ok(_) => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Q {
        status: Option<String>,
        limit: Option<String>,
    }

    #[test]
    fn decodes_into_the_struct() {
        let q: Q = parse(Some("status=a%20b+c&limit=5")).expect("valid");
        assert_eq!(
            q,
            Q {
                status: Some("a b c".into()),
                limit: Some("5".into())
            }
        );
        let q: Q = parse(Some("status=100%&limit=%zz")).expect("lenient escapes");
        assert_eq!(q.status.as_deref(), Some("100%"));
        assert_eq!(q.limit.as_deref(), Some("%zz"));
        let q: Q = parse(None).expect("none");
        assert_eq!((q.status, q.limit), (None, None));
        let _: NoParams = parse(Some("")).expect("empty");
    }

    #[test]
    fn unknown_or_repeated_parameters_are_named() {
        for (query, field) in [
            ("ofset=5", "ofset"),
            ("limit=1&limit=2", "limit"),
            ("status=a&x%20y=1", "x y"),
        ] {
            let e = parse::<Q>(Some(query)).expect_err(query);
            assert_eq!(e.code, crate::error::Code::InvalidField, "{query}");
            assert_eq!(e.field.as_deref(), Some(field), "{query}");
        }
        let e = parse::<NoParams>(Some("a=1")).expect_err("none accepted");
        assert!(e.message.contains("no query parameters"), "{}", e.message);
        assert_eq!(field_names::<Q>(), &["status", "limit"]);
    }
}
