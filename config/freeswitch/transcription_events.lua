-- NOT RUN HERE: written from FreeSWITCH's documentation (no FreeSWITCH on this machine, no
-- source in ../shared/vendor).
-- Print callscribe's transcripts as FreeSWITCH receives them (mod_audio_fork::transcription).
-- Load with: lua transcription_events.lua from fs_cli, or from lua.conf.xml as a startup script.
-- mod_audio_stream fires the same JSON as mod_audio_stream::json.
local consumer = freeswitch.EventConsumer("CUSTOM", "mod_audio_fork::transcription")
while true do
  local event = consumer:pop(1)
  if event then
    freeswitch.consoleLog("INFO", "callscribe " .. event:getHeader("Unique-ID") .. ": " .. event:getBody() .. "\n")
  end
end
