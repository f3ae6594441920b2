//! Passes nginx's detected features and version to the compiler as cfg values.
//!
//! `nginx-sys` must be a direct dependency for its `DEP_NGINX_*` variables to reach us.

use std::env;

fn main() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_feature, values({}))",
        env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    if let Ok(features) = env::var("DEP_NGINX_FEATURES") {
        for feature in features.split(',').map(str::trim) {
            println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
        }
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_os, values({}))",
        env::var("DEP_NGINX_OS_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS");
    if let Ok(os) = env::var("DEP_NGINX_OS") {
        println!("cargo::rustc-cfg=ngx_os=\"{os}\"");
    }

    // Where the nginx binary of this build lives, for the integration tests.
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(dir) = env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=NGX_WS_NGINX_BUILD_DIR={dir}");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    // nginx API differences the glue follows (the ngx crate supports 1.22 and later):
    // ngx_syslog_peer_t.hostname since 1.23.4, NGX_ERROR_IGNORE_EMSGSIZE since 1.25.2.
    println!("cargo::rustc-check-cfg=cfg(ngx_ws_syslog_peer_hostname)");
    println!("cargo::rustc-check-cfg=cfg(ngx_ws_ignore_emsgsize)");
    if let Ok(v) = env::var("DEP_NGINX_VERSION_NUMBER") {
        println!("cargo::rustc-env=NGX_WS_NGINX_VERSION_NUMBER={v}");
        let n: u64 = v.trim().parse().unwrap_or(0);
        if n >= 1_023_004 {
            println!("cargo::rustc-cfg=ngx_ws_syslog_peer_hostname");
        }
        if n >= 1_025_002 {
            println!("cargo::rustc-cfg=ngx_ws_ignore_emsgsize");
        }
    }
}
