//! Request validation shared by the server (which refuses bad input with a stable code)
//! and the SDK (which can refuse it before sending).

use crate::codes::ApiErrorCode;

/// Why a request was refused before anything was done: a code and a message naming the
/// field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// [`ApiErrorCode::InvalidRequest`] or [`ApiErrorCode::Unsupported`].
    pub code: ApiErrorCode,
    /// `<field>: <what is wrong>`.
    pub message: String,
}

impl RequestError {
    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: ApiErrorCode::InvalidRequest,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

/// Decodes `application/x-www-form-urlencoded` pairs (a query string without its `?`).
/// Keys such as `metadata.<key>` are kept as they are (serde's struct decoding of a query
/// cannot express them).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A query string from pairs, encoded (the inverse of [`query_pairs`]).
pub fn encode_query(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A non-negative integer query value.
pub(crate) fn parse_count<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, RequestError> {
    value
        .parse()
        .map_err(|_| RequestError::invalid(format!("{key}: must be a non-negative integer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trip() {
        let pairs = vec![
            ("metadata.env".to_owned(), "prod & more".to_owned()),
            ("status".to_owned(), "active,paused".to_owned()),
        ];
        let q = encode_query(&pairs);
        assert_eq!(q, "metadata.env=prod+%26+more&status=active%2Cpaused");
        assert_eq!(query_pairs(&q), pairs);
        assert_eq!(query_pairs("a=b+c&d")[0].1, "b c");
    }
}
