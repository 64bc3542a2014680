//! The page and the API document, embedded in the binary: no build step, no files to install.

pub const INDEX: axum::response::Html<&str> = axum::response::Html(include_str!("page/index.html"));
pub const JS: ([(axum::http::HeaderName, &str); 1], &str) = (
    [(
        axum::http::header::CONTENT_TYPE,
        "text/javascript; charset=utf-8",
    )],
    include_str!("page/app.js"),
);
pub const CSS: ([(axum::http::HeaderName, &str); 1], &str) = (
    [(axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8")],
    include_str!("page/style.css"),
);
pub const OPENAPI: ([(axum::http::HeaderName, &str); 1], &str) = (
    [(axum::http::header::CONTENT_TYPE, "application/json")],
    include_str!("openapi.json"),
);
