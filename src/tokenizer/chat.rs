//! Chat templates: the model's Jinja template rendered with minijinja, set up
//! like the Hugging Face / llama.cpp environments that templates are written
//! for (trimmed blocks, Python string methods, `raise_exception`).

use minijinja::{context, Environment, ErrorKind};

use super::ChatMessage;
use crate::error::{Error, Result};

pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Templates use it to stamp "today's date"; a fixed, valid date keeps
    // rendering reproducible without a clock dependency.
    format
        .replace("%Y", "2026")
        .replace("%m", "01")
        .replace("%d", "01")
        .replace("%B", "January")
        .replace("%b", "Jan")
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        ChatTemplate {
            source,
            bos_token,
            eos_token,
        }
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let tmpl = env.template_from_str(&self.source).map_err(|e| {
            Error::ChatTemplate(format!("template does not parse: {}", describe(&e)))
        })?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::ChatTemplate(format!("rendering failed: {}", describe(&e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_with_python_methods_and_tokens() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}:{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}".into(),
            "<s>".into(),
            "</s>".into(),
        );
        let out = t.render(&[msg("user", "  hi  ")], true).unwrap();
        assert_eq!(out, "<s>USER:hi\nA:");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_chat_template_errors() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            String::new(),
            String::new(),
        );
        let e = t.render(&[], false).unwrap_err();
        assert!(
            matches!(e, Error::ChatTemplate(ref m) if m.contains("roles must alternate")),
            "{e}"
        );
        let t = ChatTemplate::new("{% for %}".into(), String::new(), String::new());
        assert!(matches!(t.render(&[], false), Err(Error::ChatTemplate(_))));
    }
}
