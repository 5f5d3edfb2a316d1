//! IncrementalAlterConfigs (SET) through librdkafka's C API: rdkafka 0.39 does not wrap it.

use std::{
    ffi::{CStr, CString},
    time::Duration,
};

use rdkafka::{admin::AdminClient, bindings as rd, client::DefaultClientContext};

#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    #[error("invalid config entry {key}: {message}")]
    Entry { key: String, message: String },
    #[error("no answer from the broker in time")]
    Timeout,
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Resource(String),
    #[error("names and values cannot contain NUL bytes")]
    Nul,
}

unsafe fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Owns the librdkafka objects of one call and frees them however the call ends.
struct Call {
    queue: *mut rd::rd_kafka_queue_t,
    options: *mut rd::rd_kafka_AdminOptions_t,
    resource: *mut rd::rd_kafka_ConfigResource_t,
    event: *mut rd::rd_kafka_event_t,
}

impl Drop for Call {
    fn drop(&mut self) {
        // SAFETY: each pointer is either null or was created by librdkafka for this call and is
        // destroyed exactly once, here.
        unsafe {
            if !self.event.is_null() {
                rd::rd_kafka_event_destroy(self.event);
            }
            if !self.resource.is_null() {
                rd::rd_kafka_ConfigResource_destroy(self.resource);
            }
            if !self.options.is_null() {
                rd::rd_kafka_AdminOptions_destroy(self.options);
            }
            if !self.queue.is_null() {
                rd::rd_kafka_queue_destroy(self.queue);
            }
        }
    }
}

/// IncrementalAlterConfigs (SET) for one topic, blocking until the broker answers or `timeout`.
/// `validate_only`: the broker checks the request (and the client's rights) and changes nothing.
pub fn incremental_alter_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    set: &[(String, String)],
    timeout: Duration,
    validate_only: bool,
) -> Result<(), IncrementalError> {
    let name = CString::new(topic).map_err(|_| IncrementalError::Nul)?;
    let entries: Vec<(CString, CString)> = set
        .iter()
        .map(|(k, v)| Ok((CString::new(k.as_str())?, CString::new(v.as_str())?)))
        .collect::<Result<_, std::ffi::NulError>>()
        .map_err(|_| IncrementalError::Nul)?;
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let rk = admin.inner().native_ptr();
    // SAFETY: rk is the live handle owned by `admin`, borrowed for this call. Every object created
    // here is owned by `call` and freed by its Drop; C strings outlive the calls that read them.
    unsafe {
        let mut call = Call {
            queue: rd::rd_kafka_queue_new(rk),
            options: rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS),
            resource: rd::rd_kafka_ConfigResource_new(rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC, name.as_ptr()),
            event: std::ptr::null_mut(),
        };
        let mut errbuf = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(call.options, ms, errbuf.as_mut_ptr(), errbuf.len());
        if validate_only {
            rd::rd_kafka_AdminOptions_set_validate_only(call.options, 1, errbuf.as_mut_ptr(), errbuf.len());
        }
        for (k, v) in &entries {
            let err = rd::rd_kafka_ConfigResource_add_incremental_config(
                call.resource,
                k.as_ptr(),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                v.as_ptr(),
            );
            if !err.is_null() {
                let message = cstr(rd::rd_kafka_error_string(err));
                rd::rd_kafka_error_destroy(err);
                return Err(IncrementalError::Entry {
                    key: k.to_string_lossy().into_owned(),
                    message,
                });
            }
        }
        let mut resources = [call.resource];
        rd::rd_kafka_IncrementalAlterConfigs(rk, resources.as_mut_ptr(), 1, call.options, call.queue);
        call.event = rd::rd_kafka_queue_poll(call.queue, ms.saturating_add(1000));
        if call.event.is_null() {
            return Err(IncrementalError::Timeout);
        }
        let code = rd::rd_kafka_event_error(call.event);
        if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(IncrementalError::Transport(cstr(rd::rd_kafka_event_error_string(call.event))));
        }
        let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(call.event);
        if result.is_null() {
            return Err(IncrementalError::Transport("unexpected event type".into()));
        }
        let mut cnt = 0usize;
        let res = rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut cnt);
        for i in 0..cnt {
            let r = *res.add(i);
            if rd::rd_kafka_ConfigResource_error(r) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let msg = cstr(rd::rd_kafka_ConfigResource_error_string(r));
                let code = cstr(rd::rd_kafka_err2str(rd::rd_kafka_ConfigResource_error(r)));
                return Err(IncrementalError::Resource(if msg.is_empty() {
                    code
                } else {
                    format!("{code}: {msg}")
                }));
            }
        }
        Ok(())
    }
}
