//! One line for an error and its causes.

/// `err: cause: cause`, each source's text added once: a source whose text the line
/// already holds (an error that repeats its cause in its own message) is not repeated.
/// Every crate of kiln formats chains with this, for logs, terminals and the detail of a
/// `"<code>: <detail>"` message.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct E {
        msg: String,
        #[source]
        source: Option<Box<E>>,
    }

    fn e(msg: &str, source: Option<E>) -> E {
        E {
            msg: msg.into(),
            source: source.map(Box::new),
        }
    }

    #[test]
    fn joins_causes_once() {
        let err = e("pull failed", Some(e("connect", Some(e("refused", None)))));
        assert_eq!(error_chain(&err), "pull failed: connect: refused");
        // A message that already says its cause does not say it twice.
        let err = e("connect: refused", Some(e("refused", None)));
        assert_eq!(error_chain(&err), "connect: refused");
    }
}
